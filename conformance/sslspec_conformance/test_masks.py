"""MAE masks and patches: exact agreement with the reference, ties included."""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from sslspec_conformance import reference
from sslspec_conformance.harness import ConformanceError, spec_function
from sslspec_conformance.profiles import settings_for
from sslspec_conformance.strategies import images, mask_noise, patches

MASK_FIELDS = ("ids_keep", "ids_masked", "ids_restore", "mask")


def _check_mask(conformance, result, noise, exact_noise, ratio, what):
    expected = reference.generate_mask(exact_noise, mask_ratio=ratio)
    batch, length = exact_noise.shape
    keep = reference.kept_count(length, ratio)
    shapes = {
        "ids_keep": (batch, keep),
        "ids_masked": (batch, length - keep),
        "ids_restore": (batch, length),
        "mask": (batch, length),
    }
    xp = conformance.xp
    for field in MASK_FIELDS:
        value = getattr(result, field, None)
        if value is None:
            raise ConformanceError(f"{what}: the result has no field {field!r}")
        if field == "mask":
            conformance.assert_like(
                value, noise, shape=shapes[field], what=f"{what}.mask"
            )
        else:
            if not xp.isdtype(value.dtype, "integral"):
                raise ConformanceError(
                    f"{what}.{field}: dtype {value.dtype} is not an integer dtype"
                )
            device = conformance.backend.device_of(value)
            if device != conformance.device:
                raise ConformanceError(
                    f"{what}.{field}: on device {device!r}, input on "
                    f"{conformance.device!r}"
                )
        conformance.assert_equal(
            conformance.numpy(value), getattr(expected, field), what=f"{what}.{field}"
        )


@pytest.mark.sslspec_function("generate_mask")
@settings_for("exact")
@given(data=st.data())
def test_generate_mask(conformance, dtype, data):
    case = data.draw(mask_noise(dtype), label="case")
    note(repr(case))
    (noise,), (exact_noise,) = conformance.round_trip(case.arrays, dtype)
    ratio = case.options["mask_ratio"]

    result = spec_function("generate_mask")(noise, mask_ratio=ratio)

    _check_mask(conformance, result, noise, exact_noise, ratio, "generate_mask")


@pytest.mark.sslspec_function("generate_mask")
@settings_for("jit")
@given(data=st.data())
def test_generate_mask_jit(conformance, dtype, data):
    if not conformance.has("jit"):
        pytest.skip("the backend does not declare the jit capability")
    case = data.draw(mask_noise(dtype), label="case")
    note(repr(case))
    (noise,), (exact_noise,) = conformance.round_trip(case.arrays, dtype)
    ratio = case.options["mask_ratio"]
    generate_mask = spec_function("generate_mask")

    compiled = conformance.jit(lambda x: generate_mask(x, mask_ratio=ratio))
    result = compiled(noise)

    _check_mask(
        conformance, result, noise, exact_noise, ratio, "compiled generate_mask"
    )


@pytest.mark.sslspec_function("patchify")
@settings_for("exact")
@given(data=st.data())
def test_patchify(conformance, dtype, data):
    case = data.draw(images(dtype), label="case")
    note(repr(case))
    (batch,), (exact,) = conformance.round_trip(case.arrays, dtype)
    size = case.options["patch_size"]

    result = spec_function("patchify")(batch, size)

    expected = reference.patchify(exact, size)
    conformance.assert_like(result, batch, shape=expected.shape, what="patchify")
    conformance.assert_equal(conformance.numpy(result), expected, what="patchify")


@pytest.mark.sslspec_function("unpatchify")
@settings_for("exact")
@given(data=st.data())
def test_unpatchify(conformance, dtype, data):
    case = data.draw(patches(dtype), label="case")
    note(repr(case))
    (batch,), (exact,) = conformance.round_trip(case.arrays, dtype)
    size = case.options["patch_size"]
    image_size = case.options["image_size"]

    result = spec_function("unpatchify")(batch, size, image_size=image_size)

    expected = reference.unpatchify(exact, size, image_size=image_size)
    conformance.assert_like(result, batch, shape=expected.shape, what="unpatchify")
    conformance.assert_equal(conformance.numpy(result), expected, what="unpatchify")


@pytest.mark.sslspec_function("unpatchify")
@settings_for("exact")
@given(data=st.data())
def test_patchify_round_trip(conformance, dtype, data):
    case = data.draw(images(dtype), label="case")
    note(repr(case))
    (batch,), (exact,) = conformance.round_trip(case.arrays, dtype)
    size = case.options["patch_size"]
    height, width = exact.shape[2:]

    cut = spec_function("patchify")(batch, size)
    restored = spec_function("unpatchify")(cut, size, image_size=(height, width))

    conformance.assert_like(restored, batch, shape=exact.shape, what="round trip")
    conformance.assert_equal(conformance.numpy(restored), exact, what="round trip")


@pytest.mark.sslspec_function("patchify")
@settings_for("jit")
@given(data=st.data())
def test_patchify_jit(conformance, dtype, data):
    if not conformance.has("jit"):
        pytest.skip("the backend does not declare the jit capability")
    case = data.draw(images(dtype), label="case")
    note(repr(case))
    (batch,), (exact,) = conformance.round_trip(case.arrays, dtype)
    size = case.options["patch_size"]
    height, width = exact.shape[2:]
    patchify = spec_function("patchify")
    unpatchify = spec_function("unpatchify")

    def round_trip(images):
        cut = patchify(images, size)
        return cut, unpatchify(cut, size, image_size=(height, width))

    cut, restored = conformance.jit(round_trip)(batch)

    expected = reference.patchify(exact, size)
    conformance.assert_like(cut, batch, shape=expected.shape, what="compiled patchify")
    conformance.assert_equal(conformance.numpy(cut), expected, what="compiled patchify")
    conformance.assert_equal(
        conformance.numpy(restored), exact, what="compiled unpatchify"
    )
