"""Display forms of URLs and messages with secrets removed. For what is shown or recorded only:
a URL that is then used is never passed through here."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "session", "access_key")
# query parameters that carry credentials in presigned URLs (S3 SigV2/V4, GCS, Azure SAS)
_SECRET_PARAMS = re.compile(
    r"(x-amz-(signature|credential|security-token)|signature|sig|x-goog-(signature|credential)|token|"
    r"access_token|api_key|apikey|key|password|secret|awsaccesskeyid|se|sp|sv|skoid|sktid)$",
    re.I,
)


def redact_url(url: str) -> str:
    """`url` without user:password and without credential query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_PARAMS.match(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """Remove credentials from a message: user:secret@ in URLs, secret-looking key=values,
    and the values of the AWS secret key and session token from the environment."""
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    text = re.sub(
        r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig)=)[^&\s'\"]+",
        r"\1***",
        text,
        flags=re.I,
    )
    for word in _SECRET_WORDS:
        text = re.sub(rf"({word}[A-Za-z_]*['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}}&]+", r"\1***", text, flags=re.I)
    # the access key id is an identifier, not a secret: never replaced (it may equal a bucket name)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text
