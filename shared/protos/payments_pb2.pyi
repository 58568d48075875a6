from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("user_id", "balance")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    balance: str
    def __init__(self, user_id: _Optional[str] = ..., balance: _Optional[str] = ...) -> None: ...

class OpenAccountRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DepositRequest(_message.Message):
    __slots__ = ("amount", "idempotency_key")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    amount: str
    idempotency_key: str
    def __init__(self, amount: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
