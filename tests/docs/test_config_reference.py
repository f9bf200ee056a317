"""docs/configs.md is generated from configs/ and the code (python -m stepdistill.config_reference), and
gives every key a default and a meaning."""

import inspect
import re
from pathlib import Path

from stepdistill import config_reference
from stepdistill.config import configs_dir

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_reference_is_the_generated_one():
    assert (ROOT / "docs" / "configs.md").read_text() == config_reference.render(), (
        "docs/configs.md is stale: python -m stepdistill.config_reference")


def test_every_key_of_every_config_file_is_listed_with_a_meaning():
    page = config_reference.render()
    rows = re.findall(r"^\| `([^`]+)` \| (.*?) \| (.*) \|$", page, re.M)
    blank = [key for key, _, meaning in rows if not meaning.replace("*signature*", "").strip()]
    assert not blank, f"keys without a meaning (document them in the target's Args: or a YAML comment): {blank}"
    for path in (configs_dir() / "algorithm").glob("*.yaml"):
        assert f"### `algorithm/{path.stem}`" in page


def test_args_sections_are_read_entry_by_entry():
    doc = """Summary.

    Args:
        steps: the number of steps
            it takes (continued).
        t_min, t_max: the noise range.

    Returns:
        nothing: this is not an argument.
    """
    assert config_reference.parse_args_section(inspect.cleandoc(doc)) == {
        "steps": "the number of steps it takes (continued).", "t_min": "the noise range.",
        "t_max": "the noise range."}


def test_yaml_comments_come_from_the_line_or_the_lines_above(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# header\n_target_: x.Y\n\n# what a does\na: 1\nb:\n  c: 2   # inline c\n  d: 3\n")
    assert config_reference.yaml_comments(path) == {"_target_": "header", "a": "what a does", "b.c": "inline c"}


def test_signature_keys_the_file_leaves_out_are_listed_with_their_defaults():
    page = config_reference.render()
    dmd2 = page.split("### `algorithm/dmd2`", 1)[1].split("\n### ", 1)[0]
    assert "| `critic_updates_per_generator_update` | `5` |" in dmd2 and "*signature*" in dmd2
