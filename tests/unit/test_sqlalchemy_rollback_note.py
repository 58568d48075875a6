"""SQLAlchemy's private note of a failed flush's error, which shared.db.refuse_if_rolled_back names:
an upgrade that drops or renames it fails here, rather than the error going unnamed (SQLite in
memory, no I/O)."""

import pytest
from sqlalchemy import Integer, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shared.db import TransactionAborted, refuse_if_rolled_back


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


def test_a_flush_failure_caught_is_noted_where_refuse_if_rolled_back_reads_it():
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(_Row(id=1))
        session.flush()
        session.add(_Row(id=1))  # (the same key again: the flush fails, and is rolled back)
        with pytest.raises(IntegrityError) as caught:
            session.flush()
        transaction = session.get_transaction()
        assert transaction._rollback_exception is caught.value
        with pytest.raises(TransactionAborted) as refused:
            refuse_if_rolled_back(transaction, "refused")
    assert refused.value.__cause__ is caught.value
    assert "no error of a flush noted" not in str(refused.value)
