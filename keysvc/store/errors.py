"""Storage failures, each with one message that names the cause and what to do about it."""


class StoreError(Exception):
    """A storage failure with a message fit to show an operator as it is."""


class StoreFullError(StoreError):
    pass


class StoreLockedError(StoreError):
    pass


class StoreUnreadableError(StoreError):
    pass


class NewerSchemaError(StoreError):
    pass
