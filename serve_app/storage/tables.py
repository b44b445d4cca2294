"""The generations table and its mapping to the `Generation` record.

The schema is owned by the Alembic scripts in `storage.migrations`; a unit test checks that
this model and the newest revision agree. Columns named like a field of `Generation` are copied
by name in both directions, so a new field needs only its column (and a migration) here.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from serve_app.domain import Feedback, Generation


class Base(DeclarativeBase):
    pass


class GenerationRow(Base):
    """One served completion, with what produced it (model, revision, params) and its cost."""

    __tablename__ = "generations"
    # The keyset-paging paths: all rows, one user's, one model's, one user's with one model.
    # Their leading columns also serve plain `user_id = ?` / `model_name = ?` lookups (and the
    # purge's `created_at < ?`), so single-column indexes would only add write cost.
    __table_args__ = (
        Index("ix_generations_created_at_id", "created_at", "id"),
        Index("ix_generations_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_generations_model_name_created_at_id", "model_name", "created_at", "id"),
        Index(
            "ix_generations_user_id_model_name_created_at_id",
            "user_id",
            "model_name",
            "created_at",
            "id",
        ),
        # One API key's records: its own history when keys are on.
        Index("ix_generations_key_name_created_at_id", "key_name", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Naive UTC: TIMESTAMP WITHOUT TIME ZONE on PostgreSQL, a fixed-width ISO string on SQLite.
    # Both keep microseconds and compare in time order.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)
    prompt: Mapped[str] = mapped_column(Text)
    generated_text: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(String(64))
    model_source: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_id: Mapped[str | None] = mapped_column(String(128))
    key_name: Mapped[str | None] = mapped_column(String(64))  # the API key's name
    cached: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(16))  # length, stop, cancelled
    # none_as_null: a missing value is SQL NULL (queries test it), not the JSON text null.
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON(none_as_null=True))
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    # The attribute `metadata` is SQLAlchemy's own; the column keeps the API's name.
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON(none_as_null=True))
    feedback_rating: Mapped[int | None] = mapped_column(Integer)
    feedback_comment: Mapped[str | None] = mapped_column(Text)
    feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=False))


_SAME_NAME = tuple(
    column.key
    for column in GenerationRow.__table__.columns
    if column.key in {f.name for f in dataclasses.fields(Generation)}
    and column.key not in ("id", "created_at", "metadata")  # metadata: see metadata_
)


def to_values(record: Generation, id: str, created_at: datetime) -> dict[str, Any]:
    """The column values of a new row for `record` (`created_at` naive UTC)."""
    values = {name: getattr(record, name) for name in _SAME_NAME}
    values.update(
        id=id,
        created_at=created_at,
        generated_text=record.generated_text,
        model_name=record.model,
        metadata=record.metadata,
    )
    return values


def from_row(row: GenerationRow) -> Generation:
    """A committed row as a record, detached from the ORM (it pickles across a handle)."""
    feedback = None
    if row.feedback_rating is not None:
        feedback = Feedback(row.feedback_rating, row.feedback_comment, aware(row.feedback_at))
    return Generation(
        **{name: getattr(row, name) for name in _SAME_NAME},
        id=row.id,
        created_at=aware(row.created_at),
        model=row.model_name,
        completion=row.generated_text[len(row.prompt) :],
        metadata=row.metadata_,
        feedback=feedback,
    )


def naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def aware(value: datetime | None) -> datetime | None:
    """A naive-UTC column value as an aware UTC datetime."""
    return None if value is None else value.replace(tzinfo=timezone.utc)


def iso_z(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a `Z` suffix, as the API shows timestamps."""
    return naive_utc(value).isoformat(timespec="microseconds") + "Z"


def _wall_clock_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class MonotonicUtcClock:
    """Naive-UTC now, strictly increasing within the process even if the wall clock steps back.

    Makes ORDER BY (created_at, id) equal insertion order for one process; across processes the
    id breaks ties.
    """

    def __init__(self, wall_clock: Callable[[], datetime] = _wall_clock_utc) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # Ray replicas may call from more than one thread
        self._last: datetime | None = None

    def now(self) -> datetime:
        now = self._wall_clock()
        with self._lock:
            if self._last is not None and now <= self._last:
                now = self._last + timedelta(microseconds=1)
            self._last = now
            return now
