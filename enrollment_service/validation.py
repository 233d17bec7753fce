"""The contract's bounds as named types, and strict decoding of request bodies into Structs.

Litestar decodes bodies in msgspec's lax mode ("5" would pass as 5) and stops at the first bad
field. `StrictBody` is a DTO that decodes the raw bytes itself: strict JSON types, strings trimmed
before they are checked, unknown fields rejected, and every bad field reported at once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from litestar._openapi.schema_generation import SchemaCreator
from litestar.dto import MsgspecDTO
from litestar.openapi.spec import Reference, Schema
from litestar.params import Parameter, ParameterKwarg
from litestar.typing import FieldDefinition
from msgspec import Meta

from enrollment_service.idempotency import KEY_MESSAGE, parse_key
from enrollment_service.problems import (
    IDEMPOTENCY_KEY_FIELD,
    FieldError,
    UnsupportedMediaType,
    ValidationFailed,
)

MAX_ID = 2**63 - 1
# Unicode control characters (category Cc): C0, DEL and C1.
NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f-\x9f]*$"

Id = Annotated[int, Meta(ge=1, le=MAX_ID, description="A positive 64-bit id")]
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=NO_CONTROL_CHARS,
        description="1-200 characters after trimming surrounding whitespace",
    ),
]
Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=254,
        pattern=r"^[^\s@\x00-\x1f\x7f-\x9f]+@[^\s@\x00-\x1f\x7f-\x9f]+$",
        description="3-254 characters with exactly one @; unique case-insensitively",
    ),
]
Code = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=32,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="1-32 characters of [A-Za-z0-9_.-]; unique case-insensitively",
    ),
]
Level = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=50,
        pattern=NO_CONTROL_CHARS,
        description="1-50 characters after trimming surrounding whitespace",
    ),
]
Capacity = Annotated[int, Meta(ge=0, le=1_000_000, description="Seats; null means no limit")]

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def decode_strict(raw: bytes, model: type[S]) -> S | list[FieldError]:
    """Decode `raw` into `model` (strings trimmed first), or return one FieldError per bad
    field: the whole object is converted at once, and only a body that fails is gone through
    field by field to name every problem."""
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return [FieldError("body", "is not valid JSON in UTF-8")]
    if not isinstance(data, dict):
        return [FieldError("body", "must be a JSON object")]
    trimmed = {
        key: value.strip() if isinstance(value, str) else value for key, value in data.items()
    }
    try:
        return msgspec.convert(trimmed, model, strict=True)
    except msgspec.ValidationError as error:
        return _field_errors(trimmed, model) or [FieldError("body", str(error))]


@functools.cache
def _fields(model: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {field.encode_name: field for field in msgspec.structs.fields(model)}


def _field_errors(data: dict[str, Any], model: type[msgspec.Struct]) -> list[FieldError]:
    fields = _fields(model)
    errors = [FieldError(key, "is not a known field") for key in data if key not in fields]
    for name, struct_field in fields.items():
        if name not in data:
            if struct_field.required:
                errors.append(FieldError(name, "is required"))
            continue
        try:
            msgspec.convert(data[name], struct_field.type, strict=True)
        except msgspec.ValidationError as error:
            errors.append(FieldError(name, str(error).split(" - at `", 1)[0]))
    return errors


class StrictBody(MsgspecDTO[S], Generic[S]):
    """Use as `dto=StrictBody[NewStudent]` (with `return_dto=None`) on a handler taking `data`."""

    def decode_bytes(self, value: bytes) -> Any:
        content_type = self.asgi_connection.headers.get("content-type", "")
        if not is_json_media_type(content_type):
            raise UnsupportedMediaType(content_type)
        result = decode_strict(value, self.model_type)
        if isinstance(result, list):
            # Litestar checks the path only after the body: report a bad path id here too,
            # so that every bad field is listed at once.
            raise ValidationFailed(
                path_id_errors(self.asgi_connection.path_params)
                + idempotency_key_errors(self.asgi_connection.headers.get("idempotency-key"))
                + result
            )
        return result

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        # Document the Struct itself, exactly as a handler taking it without a DTO would.
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))


class PathId(int):
    """An id in a URL path. Its own type so that Litestar hands the raw text to `to_path_id`:
    msgspec's lax mode would read "1.0" or "1e0" as 1."""


_DIGITS = re.compile(r"[0-9]{1,19}")
PATH_ID_MESSAGE = f"must be an integer from 1 to {MAX_ID}"


def to_path_id(_: type, raw: Any) -> PathId:
    if isinstance(raw, str) and _DIGITS.fullmatch(raw) and 1 <= int(raw) <= MAX_ID:
        return PathId(raw)
    raise ValueError(PATH_ID_MESSAGE)


#: For Litestar's `type_decoders`.
TYPE_DECODERS = [(lambda annotation: annotation is PathId, to_path_id)]


def path_id(description: str) -> ParameterKwarg:
    """The OpenAPI description of a path id (Litestar cannot infer one for PathId)."""
    parameter: ParameterKwarg = Parameter(
        description=description,
        schema_extra={"type": "integer", "minimum": 1, "maximum": MAX_ID},
    )
    return parameter


def path_id_errors(path_params: Mapping[str, Any]) -> list[FieldError]:
    """Every path parameter of this API is an id."""
    errors = []
    for name, raw in path_params.items():
        try:
            to_path_id(PathId, raw)
        except ValueError:
            errors.append(FieldError(name, PATH_ID_MESSAGE))
    return errors


def idempotency_key_errors(raw: str | None) -> list[FieldError]:
    """The Idempotency-Key header, listed with the body's bad fields when it is bad too."""
    if raw is None or parse_key(raw) is not None:
        return []
    return [FieldError(IDEMPOTENCY_KEY_FIELD, KEY_MESSAGE)]


def given_or_none(value: T | msgspec.UnsetType) -> T | None:
    """A PATCH field's value, or None when the caller left it out (the SQL keeps the old one)."""
    return None if isinstance(value, msgspec.UnsetType) else value
