"""Transfer failures as types, so that callers choose a policy (recompute, retry, fail) by kind."""


class KVTransferError(RuntimeError):
    """Base of every KV transfer failure."""


class KVNotFoundError(KVTransferError):
    """No transfer under this key: never opened, already released, or dropped by a store restart."""


class KVExpiredError(KVTransferError):
    """The transfer existed but its lease ran out before it was claimed; its memory is already freed."""


class KVPayloadError(KVTransferError):
    """The payload does not match the layout the receiver expects (wrong shape or dtype, or not an array)."""


class KVStoreFullError(KVTransferError):
    """Taking this transfer would exceed the store's memory bound; the sender keeps nothing and decode recomputes."""


class KVTimeoutError(KVTransferError):
    """The transfer's parts did not all arrive in time."""
