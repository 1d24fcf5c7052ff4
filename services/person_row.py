"""One CSV row of the people import as a typed, validated model.

The import reads a row into `PersonRow.from_cells`; every problem of the row is collected
at once (pydantic validates every field before it reports), so a user fixes a line in one
go. Identities come out normalized (services/identities.py), the known person columns
typed and length-checked, everything else kept as custom fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from models.identity_kinds import FIELD_KIND
from models.time_fields import ZoneName
from services.identities import normalize

__all__ = ["MAX_LENGTH", "PERSON_COLUMNS", "PersonRow", "RowProblems"]

MAX_LENGTH = {"first_name": 200, "last_name": 200, "company": 300, "timezone": 64}
PERSON_COLUMNS = tuple(MAX_LENGTH)


class RowProblems(ValueError):
    """Every reason a row was refused, joined with "; " in column order."""


Name = Annotated[str | None, StringConstraints(max_length=MAX_LENGTH["first_name"])]
Company = Annotated[str | None, StringConstraints(max_length=MAX_LENGTH["company"])]
Zone = Annotated[ZoneName, StringConstraints(max_length=MAX_LENGTH["timezone"])] | None


class PersonRow(BaseModel):
    """A person as one CSV row gives it: columns, normalized identities, custom fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_name: Name = None
    last_name: Name = None
    company: Company = None
    timezone: Zone = None
    #: identity kind -> normalized value
    identities: dict[str, str] = Field(default_factory=dict)
    #: other columns, by their own name
    custom: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_cells(cls, row: dict[str, str]) -> PersonRow:
        """The row's model; raises RowProblems naming every problem (column: reason)."""
        person: dict[str, Any] = {}
        ident_cells: dict[str, str] = {}
        custom: dict[str, str] = {}
        for key, raw in row.items():
            value = (raw or "").strip()
            if not value:
                continue
            if key in FIELD_KIND:
                ident_cells[key] = value
            elif key in PERSON_COLUMNS:
                person[key] = value
            else:
                custom[key] = value
        problems: list[str] = []
        identities: dict[str, str] = {}
        for column, value in ident_cells.items():
            kind = FIELD_KIND[column]
            try:
                identities[kind] = normalize(kind, value)
            except ValueError as err:
                problems.append(f"{column}: {err}")
        if not ident_cells:
            problems.append(f"no identity: fill at least one of {', '.join(FIELD_KIND)}")
        try:
            model = cls(**person, identities=identities, custom=custom)
        except ValidationError as err:
            problems += [_describe(e) for e in err.errors(include_url=False)]
            model = None
        if problems or model is None:
            raise RowProblems("; ".join(problems))
        return model

    def person_values(self) -> dict[str, Any]:
        """The known person columns that the row fills."""
        return {k: v for k in PERSON_COLUMNS if (v := getattr(self, k)) is not None}


def _describe(error: Any) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "row"
    if error["type"] == "string_too_long":
        return f"{field}: longer than {error['ctx']['max_length']} characters"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"
