"""The one error type of the adaptor package."""


class AdaptorError(ValueError):
    """A fair-adaptor file or adaptor that cannot be used. The message is one line naming the problem."""


def list_some(items: list[str], shown: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more``: a one-line list of the first ``shown`` items (sorted)."""
    text = ", ".join(repr(item) for item in sorted(items)[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")
