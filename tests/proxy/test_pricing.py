"""The price table: arithmetic, patterns, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.pricing import Pricing, PricingError


def table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return path


def test_cost_per_million_tokens_exact_names_before_patterns(tmp_path: Path) -> None:
    pricing = Pricing.load(
        table(
            tmp_path,
            """
currency = "CNY"
[models."qwen3-vl-*"]
input_per_million = 1.0
output_per_million = 10.0
[models."qwen3-vl-8b-instruct"]
input_per_million = 0.5
output_per_million = 2.0
""",
        )
    )
    assert pricing.currency == "CNY" and pricing.priced
    assert pricing.cost("qwen3-vl-8b-instruct", 1_000_000, 0) == 0.5
    assert pricing.cost("qwen3-vl-8b-instruct", 1200, 40) == pytest.approx(
        (1200 * 0.5 + 40 * 2.0) / 1e6
    )
    assert pricing.cost("qwen3-vl-plus", 2_000_000, 100_000) == pytest.approx(2.0 + 1.0)
    assert pricing.price("gpt-4o") is None and pricing.cost("gpt-4o", 10**6, 10**6) == 0.0


def test_no_table_prices_nothing() -> None:
    pricing = Pricing.none()
    assert not pricing.priced and pricing.currency is None
    assert pricing.cost("qwen3-vl-8b-instruct", 10**6, 10**6) == 0.0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("currency = \n", "not valid TOML"),
        ("[models.m]\ninput_per_million = 1\noutput_per_million = 1\n", "currency"),
        (
            'currency = "USD"\n[models.m]\ninput_per_million = -1\noutput_per_million = 1\n',
            "m.input_per_million",
        ),
        ('currency = "USD"\n[models.m]\ninput_per_million = 1\n', "m.output_per_million"),
        ('currency = "USD"\nmodels = {}\nextra = 1\n', "extra"),
        (
            'currency = "USD"\n[models.m]\ninput_per_million = "cheap"\noutput_per_million = 1\n',
            "m.input_per_million",
        ),
    ],
)
def test_a_bad_table_names_its_problem(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(PricingError, match=problem):
        Pricing.load(table(tmp_path, text))


def test_a_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="cannot read"):
        Pricing.load(tmp_path / "nope.toml")


def test_the_example_table_loads() -> None:
    example = Path(__file__).parents[2] / "docs" / "pricing.example.toml"
    pricing = Pricing.load(example)
    assert pricing.price("qwen3-vl-8b-instruct") is not None
