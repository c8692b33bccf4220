"""The store's dashboard: a static site built from the catalog (`asd dashboard build|serve`)."""
