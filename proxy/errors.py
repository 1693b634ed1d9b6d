"""The proxy's own errors and their OpenAI-shaped responses.

    ProxyError                  an error the proxy answers itself (status + OpenAI error body)
    +-- BodyTooLarge            413: the request body is over --max-body-bytes
    +-- BodyTimeout             408: the request body took longer than --body-read-timeout
    +-- UpstreamUnreachable     502: the upstream could not be connected to or broke off
    +-- UpstreamTimeout         504: the upstream did not answer in time
    Uncacheable                 a chat request the cache will not key: passed through untouched
    ImageFetchError             an image URL that could not be fetched safely (-> Uncacheable)

Upstream responses, errors included, pass through byte for byte; only these errors are the
proxy's own words, in the shape OpenAI clients already parse:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from aiohttp import web


class ProxyError(Exception):
    """An error the proxy answers with its own OpenAI-shaped response."""

    status = 500
    error_type = "proxy_error"
    code = "proxy_error"

    def response(self) -> web.Response:
        """The OpenAI-shaped JSON error response."""
        body = {
            "error": {
                "message": str(self),
                "type": self.error_type,
                "param": None,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status, headers={"X-Cache": "BYPASS"})


class BodyTooLarge(ProxyError):
    """The request body is larger than the configured limit."""

    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class BodyTimeout(ProxyError):
    """The client did not finish sending its request body in time (slow-loris)."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class ClientGone(Exception):
    """The client closed the connection before its request body was complete."""


class UpstreamUnreachable(ProxyError):
    """The upstream refused, reset or dropped the connection."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream took longer than the configured timeouts."""

    status = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


class Uncacheable(Exception):
    """A chat request the cache must not key; it goes to the upstream untouched."""


class ImageFetchError(Uncacheable):
    """An image URL that could not be fetched within the limits (or points somewhere private)."""
