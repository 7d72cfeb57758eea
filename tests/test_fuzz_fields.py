"""Fuzz every sampling and config field: a bad value is a ValueError naming the field, never a
TypeError, OverflowError or a library's error; a good value is accepted.

The pure entry points (`make_params`, `EngineConfig.replace`) take hundreds of examples; the
engine's own doors (`submit`, `reconfigure`) take a few dozen on one engine.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.config import LIVE_FIELDS, EngineConfig
from workbench.inputs import make_params
from workbench.request import MAX_SEED

ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.builds(object),
)

GOOD_SAMPLING = {
    "max_new_tokens": st.integers(1, 10_000_000),
    "temperature": st.one_of(st.floats(0, 1e4), st.integers(0, 100)),
    "top_k": st.integers(0, 2**31 - 1),
    "top_p": st.floats(0, 1, exclude_min=True),
    "seed": st.one_of(st.none(), st.integers(0, MAX_SEED)),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=3)),
    "ignore_eos": st.booleans(),
}

GOOD_CONFIG = {
    "block_size": st.integers(1, 256), "num_blocks": st.one_of(st.none(), st.integers(1, 10_000_000)),
    "max_batch": st.integers(1, 4096), "token_budget": st.integers(1, 1_000_000),
    "max_model_len": st.one_of(st.none(), st.integers(2, 10_000_000)), "prefix_caching": st.booleans(),
    "policy": st.sampled_from(["continuous", "static", "sequential"]), "device": st.sampled_from([None, "cpu", "cuda:1"]),
    "dtype": st.sampled_from([None, "float32", "bfloat16", "float16"]),
    "kernels": st.sampled_from(["auto", "torch", "triton"]), "overlap": st.sampled_from([None, True, False]),
    "decode_steps": st.one_of(st.none(), st.integers(1, 64)), "cuda_graphs": st.booleans(), "block_weights": st.booleans(), "freeze_gc": st.sampled_from([None, True, False]),
    "max_queue": st.one_of(st.none(), st.integers(1, 10_000_000)), "telemetry_steps": st.integers(16, 10_000_000),
    "gpu_memory_fraction": st.floats(0.05, 0.99), "seed": st.integers(0, MAX_SEED),
}


def raises_value_error_naming(field: str, fn) -> bool:
    """True if fn() succeeded; False if it raised a ValueError naming `field`; any other error fails."""
    try:
        fn()
    except ValueError as exc:
        assert re.search(rf"\b{field}\b", str(exc)), f"the message does not name {field}: {exc}"
        return False
    return True


def test_every_field_has_a_strategy():
    assert set(GOOD_SAMPLING) == set(make_params(None, {}).__dataclass_fields__)
    assert set(GOOD_CONFIG) == set(EngineConfig.__dataclass_fields__)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(GOOD_SAMPLING)), value=ANYTHING)
def test_sampling_fields_any_value_is_accepted_or_a_value_error(field, value):
    raises_value_error_naming(field, lambda: make_params(None, {field: value}))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_sampling_fields_good_values_are_accepted(data):
    values = {f: data.draw(s) for f, s in GOOD_SAMPLING.items()}
    params = make_params(None, values)
    assert params.seed == values["seed"]
    if isinstance(values["temperature"], float):
        assert math.isfinite(params.temperature)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(GOOD_CONFIG)), value=ANYTHING)
def test_config_fields_any_value_is_accepted_or_a_value_error(field, value):
    raises_value_error_naming(field, lambda: EngineConfig().replace(**{field: value}))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_config_fields_good_values_are_accepted(data):
    values = {f: data.draw(s) for f, s in GOOD_CONFIG.items()}
    assert EngineConfig().replace(**values) == EngineConfig(**values)


@pytest.fixture(scope="module")
def engine(embedded):
    import workbench

    eng = workbench.Engine(embedded, num_blocks=32, max_batch=2)
    yield eng
    eng.check_invariants()
    eng.stop()
    assert not eng.outputs.live and eng.blocks.num_free == eng.blocks.limit


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(GOOD_SAMPLING)), value=ANYTHING)
def test_submit_with_any_sampling_value_is_queued_or_a_value_error(engine, field, value):
    handle = None

    def submit():
        nonlocal handle
        handle = engine.submit("Hi", **{"max_new_tokens": 1, field: value})

    if raises_value_error_naming(field, submit):
        engine.cancel(handle.request_id)
        assert handle.result(timeout=60).error is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(LIVE_FIELDS)), value=ANYTHING)
def test_reconfigure_with_any_live_value_applies_or_is_a_value_error(engine, field, value):
    before = engine.config
    if raises_value_error_naming(field, lambda: engine.reconfigure(**{field: value})):
        on_cpu = {"overlap": False, "decode_steps": 1}  # None: the device's default, here a CPU's
        assert getattr(engine.config, field) == (value if value is not None else on_cpu[field])
    else:
        assert engine.config == before
    engine.reconfigure(**{f: getattr(before, f) for f in LIVE_FIELDS})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["num_blocks", "max_batch", "token_budget"]), value=st.integers(-10, 40))
def test_reconfigure_integer_fields_at_and_past_their_ends(engine, field, value):
    limits = {"num_blocks": (1, engine.capacity), "max_batch": (1, 4096), "token_budget": (1, 1_000_000)}
    lo, hi = limits[field]
    ok = raises_value_error_naming(field, lambda: engine.reconfigure(**{field: value}))
    assert ok == (lo <= value <= hi)
    if not ok:
        with pytest.raises(ValueError, match=re.escape(f"[{lo}, {hi}]")):
            engine.reconfigure(**{field: value})
    engine.reconfigure(num_blocks=engine.capacity, max_batch=2, token_budget=512)
