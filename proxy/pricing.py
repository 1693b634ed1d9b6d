"""The price table: what one model's input and output tokens cost, per million.

A TOML file (``--pricing``) in one currency::

    currency = "USD"

    [models."qwen3-vl-8b-instruct"]
    input_per_million = 0.18
    output_per_million = 0.68

    [models."qwen3-vl-*"]          # shell-style patterns; an exact name wins over a pattern
    input_per_million = 0.50
    output_per_million = 1.50

A model the table does not price costs nothing (tokens and time are still counted). One currency
per table keeps the ledger's cost column meaningful.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class PricingError(ValueError):
    """The price table cannot be read or is not valid."""


class _Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(min_length=1, max_length=12)
    models: dict[str, _Price]


@dataclass(frozen=True, slots=True)
class Price:
    """One model's price per million input (prompt) and output (completion) tokens."""

    input_per_million: float
    output_per_million: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What these tokens cost."""
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1_000_000


class Pricing:
    """Prices by model name (exact names first, then patterns in file order)."""

    def __init__(self, currency: str | None, prices: dict[str, Price]) -> None:
        self.currency = currency
        self._exact = {name: p for name, p in prices.items() if not _is_pattern(name)}
        self._patterns = [(name, p) for name, p in prices.items() if _is_pattern(name)]
        self._resolved: dict[str, Price | None] = {}

    @classmethod
    def none(cls) -> Pricing:
        """No price table: every cost is unknown (None)."""
        return cls(None, {})

    @classmethod
    def load(cls, path: Path) -> Pricing:
        """Read and validate the TOML table at ``path`` (``PricingError`` naming the problem)."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PricingError(f"cannot read the price table {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PricingError(f"price table {path} is not valid TOML: {exc}") from None
        try:
            table = _Table.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'table'}: {e['msg']}" for e in exc.errors()
            )
            raise PricingError(f"price table {path}: {problems}") from None
        prices = {
            name: Price(p.input_per_million, p.output_per_million)
            for name, p in table.models.items()
        }
        return cls(table.currency, prices)

    @property
    def priced(self) -> bool:
        """True when a table was given."""
        return self.currency is not None

    def price(self, model: str) -> Price | None:
        """The price of ``model``, or None when the table does not name it."""
        if model in self._resolved:
            return self._resolved[model]
        found = self._exact.get(model)
        if found is None:
            found = next(
                (p for name, p in self._patterns if fnmatch.fnmatchcase(model, name)), None
            )
        if len(self._resolved) < 10_000:  # model names come from clients: keep the memo bounded
            self._resolved[model] = found
        return found

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What these tokens of ``model`` cost (0 when unpriced)."""
        price = self.price(model)
        return 0.0 if price is None else price.cost(prompt_tokens, completion_tokens)


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")
