"""Every HC option declared once: the flags, module arguments, checkpoint record and README
table derived from the declarations agree with them."""

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig as MCoreTransformerConfig

from megatron.hyper_connections import HyperConnection, ManifoldHyperConnection, TransformerConfig
from megatron.hyper_connections.checkpointing import hyper_connection_record
from megatron.hyper_connections.options import (
    add_hyper_connection_arguments,
    flag_of,
    hyper_connection_kwargs,
    hyper_connection_options,
    kind_of,
    module_kwargs,
    must_match_fields,
    options_table,
)
from megatron.hyper_connections.training.parser import build_parser
from tests.models import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
OPTIONS = hyper_connection_options()


def test_every_field_the_package_adds_is_a_declared_option() -> None:
    mcore = {field.name for field in dataclasses.fields(MCoreTransformerConfig)}
    added = [f.name for f in dataclasses.fields(TransformerConfig) if f.name not in mcore]
    assert added == [field.name for field, _ in OPTIONS]


def test_readme_options_table_is_generated_from_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- options table: generated -->\n") + len(
        "<!-- options table: generated -->\n"
    )
    end = text.index("<!-- end of options table -->")
    assert text[start:end] == options_table(), (
        "README.md's options table is stale: replace it by the output of "
        "`python -m megatron.hyper_connections.options`"
    )


def test_trainer_has_one_flag_per_option_with_the_fields_name_and_default() -> None:
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for field, _ in OPTIONS:
        action = actions[field.name]
        assert action.option_strings == [flag_of(field.name)]
        assert action.default == field.default
    args = parser.parse_args([])
    assert hyper_connection_kwargs(args) == {
        field.name: field.default for field, _ in OPTIONS if field.default is not None
    }


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--hyper-connections-static"], "hyper_connections_dynamic", False),
        (["--hyper-connections-no-tanh"], "hyper_connections_tanh", False),
        (["--num-residual-streams", "4"], "num_residual_streams", 4),
        (["--mhc-h-res-bias-init", "2.5"], "mhc_h_res_bias_init", 2.5),
        (["--mhc-sinkhorn-iters", "3"], "mhc_sinkhorn_iters", 3),
    ],
)
def test_a_flag_sets_its_field(argv, field, value) -> None:
    assert hyper_connection_kwargs(build_parser().parse_args(argv))[field] == value


def test_flags_a_parser_already_defines_are_skipped() -> None:
    """Megatron-LM's parser may define some of them (a later release defines
    ``--num-residual-streams``): the parser's own flag stays, the others are added."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-residual-streams", type=int, default=None)
    add_hyper_connection_arguments(parser)
    args = parser.parse_args(["--use-hyper-connections"])
    assert args.num_residual_streams is None
    kwargs = hyper_connection_kwargs(args)
    assert kwargs["use_hyper_connections"] is True
    assert "num_residual_streams" not in kwargs  # not given: the field's default applies


@pytest.mark.parametrize(
    ("options", "module"),
    [
        (dict(use_hyper_connections=True, num_residual_streams=4), HyperConnection),
        (dict(use_hyper_connections=True, num_fracs=4), HyperConnection),
        (
            dict(
                use_hyper_connections=True,
                use_manifold_hyper_connections=True,
                num_residual_streams=4,
                mhc_sinkhorn_iters=7,
            ),
            ManifoldHyperConnection,
        ),
        (
            dict(
                use_hyper_connections=True,
                use_manifold_hyper_connections=True,
                num_residual_streams=3,
                mhc_h_res_parameterization="permutations",
            ),
            ManifoldHyperConnection,
        ),
    ],
)
def test_module_arguments_are_the_declared_ones_of_the_kind(options, module) -> None:
    config = TransformerConfig(**{**TINY, **options})
    kwargs = module_kwargs(config)
    accepted = inspect.signature(module).parameters
    assert set(kwargs) <= set(accepted), set(kwargs) - set(accepted)
    kind = kind_of(config)
    expected = {o.module_arg for _, o in OPTIONS if o.module_arg and kind in o.kinds}
    assert set(kwargs) == expected
    for field, option in OPTIONS:
        if option.module_arg in kwargs:
            assert kwargs[option.module_arg] == getattr(config, field.name)


def test_checkpoint_record_holds_the_variant_and_every_must_match_option() -> None:
    config = TransformerConfig(**TINY, use_hyper_connections=True, num_residual_streams=2)
    record = hyper_connection_record(config)
    assert set(record) == {"use_hyper_connections", "variant", *must_match_fields()}
    assert must_match_fields() == (
        "num_residual_streams",
        "num_fracs",
        "hyper_connections_tanh",
        "mhc_num_dynamic_alpha_proposals",
        "mhc_h_res_parameterization",
    )
