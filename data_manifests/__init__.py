"""The contracts every layer shares, defined once: Arrow schemas of every manifest
(`schemas.py`), the typed settings of every stage (`settings.py`), and the small checked-in
demo manifests with the code that materialises them (`demo.py`)."""
