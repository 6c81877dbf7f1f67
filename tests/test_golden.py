"""Golden stores of each format version keep loading bit for bit, and format 2 is still written the same way."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal, assert_state_bits_equal
from golden_v1 import mask, step_state
from golden_v2 import mask as golden_v2_mask
from golden_v2 import optimizer_state as golden_v2_optimizer
from golden_v2 import step_state as golden_v2_step
from safetensors import safe_open

from fishckpt import CheckpointStore, FormatError, Mask, OutsideMaskWarning
from fishckpt.format import container, manifest, maskfile
from fishckpt.format.codec import Section

GOLDEN = Path(__file__).parent / "data" / "store_v1"


@pytest.fixture
def golden(tmp_path: Path) -> CheckpointStore:
    copy = tmp_path / "store_v1"
    shutil.copytree(GOLDEN, copy)  # the test may write a lock file; keep the checked-in copy pristine
    return CheckpointStore.open(copy)


def test_golden_store_loads_bit_exact(golden: CheckpointStore) -> None:
    assert golden.steps == [1, 2]
    assert golden.mask == mask()
    for step in (1, 2):
        loaded = golden.load(step)
        assert_state_bits_equal(loaded, step_state(step))
        assert loaded["head.weight"] is loaded["layer.weight"]
    golden.verify()
    info = golden.info(2)
    assert info.metadata == {"note": "with buffers"}
    assert info.changed_outside_mask == {"layer.weight": 1, "counts": 5, "flags": 1}


def test_golden_v1_store_is_read_only_and_says_how_to_upgrade(golden: CheckpointStore) -> None:
    assert golden.format_version == 1 and golden.store_id is None
    with pytest.raises(FormatError, match="format 1, which this fishckpt reads but no longer writes; run `fishckpt up"):
        golden.save(step_state(2), 3)
    assert golden.steps == [1, 2]


def test_golden_v1_store_upgrades_bit_exact(golden: CheckpointStore) -> None:
    before = {step: golden.load(step) for step in golden.steps}
    created = golden.info(2).created
    upgraded = CheckpointStore.upgrade(golden.path)
    assert upgraded.format_version == 2 and upgraded.store_id is not None
    assert upgraded.steps == [1, 2]
    assert sorted(p.name for p in Path(upgraded.path).iterdir()) == [
        ".lock",
        "base.safetensors",
        "manifest.safetensors",
        "mask.safetensors",
        "steps",
    ]
    upgraded.verify()
    for step in (1, 2):
        assert_state_bits_equal(upgraded.load(step), before[step])
        assert_state_bits_equal(upgraded.load(step), step_state(step))
    assert upgraded.info(2).metadata == {"note": "with buffers"}
    assert upgraded.info(2).created == created
    with pytest.warns(OutsideMaskWarning, match=r"counts \(5\)"):
        upgraded.save(step_state(2), 3)  # and it takes new steps
    assert_state_bits_equal(CheckpointStore.open(golden.path).load(3), step_state(2))
    with pytest.raises(FormatError, match="already format 2"):
        CheckpointStore.upgrade(golden.path)


# Format 2 -----------------------------------------------------------------------------------------

GOLDEN_V2 = Path(__file__).parent / "data" / "store_v2"


@pytest.fixture
def golden_v2(tmp_path: Path) -> CheckpointStore:
    copy = tmp_path / "store_v2"
    shutil.copytree(GOLDEN_V2, copy)
    return CheckpointStore.open(copy)


def test_golden_v2_store_loads_bit_exact(golden_v2: CheckpointStore) -> None:
    assert golden_v2.format_version == 2 and golden_v2.steps == [1, 2]
    assert golden_v2.mask == golden_v2_mask()
    for step in (1, 2):
        loaded = golden_v2.load(step)
        assert_state_bits_equal(loaded, golden_v2_step(step))
        assert loaded["head.weight"] is loaded["layer.weight"]
    golden_v2.verify()
    info = golden_v2.info(2)
    assert info.metadata["note"] == "with changes" and math.isnan(info.metadata["loss"])
    assert info.changed_outside_mask == {"layer.weight": 2, "counts": 50, "flags": 1}


def test_golden_v2_training_state_loads(golden_v2: CheckpointStore) -> None:
    class Receiver:
        loaded: dict | None = None

        def load_state_dict(self, state: dict) -> None:
            self.loaded = state

    receiver = Receiver()
    golden_v2.load_training_state(2, receiver, rng=False)  # type: ignore[arg-type]
    expected = golden_v2_optimizer(2)
    assert receiver.loaded is not None
    assert receiver.loaded["param_groups"] == expected["param_groups"]
    got, want = receiver.loaded["state"][0], expected["state"][0]  # type: ignore[index]
    assert got["step"] == want["step"]
    assert_bits_equal(got["exp_avg"], want["exp_avg"])
    assert_bits_equal(got["count"], want["count"])


def test_format_2_is_still_written_byte_for_byte_the_same(golden_v2: CheckpointStore) -> None:
    """Coding the golden states again gives the golden sections, byte for byte: the format has not drifted.

    The exponent order's many ties make this fail if the order's sort stopped being stable.
    """
    golden_v2.save(golden_v2_step(1), 11, metadata={"note": "masked only"})
    with pytest.warns(OutsideMaskWarning):
        golden_v2.save(golden_v2_step(2), 12, metadata={"note": "with changes", "loss": float("nan")})
    for golden_step, again in ((1, 11), (2, 12)):
        with (
            safe_open(golden_v2.step_path(golden_step), "pt") as before,
            safe_open(golden_v2.step_path(again), "pt") as now,
        ):
            names = sorted(n for n in before.keys() if not n.startswith("training."))  # noqa: SIM118  # not a dict
            assert names == sorted(now.keys())
            for name in names:
                assert torch.equal(before.get_tensor(name), now.get_tensor(name)), name


def test_the_format_1_writers_still_write_the_golden_files() -> None:
    """The format 1 writers are kept to make fixtures of old stores, so they must still write fishckpt 0.1's bytes."""
    manifest_bytes = (GOLDEN / "fishckpt.json").read_bytes()
    assert manifest.to_json_v1(manifest.parse_v1(manifest_bytes, where="m")) == manifest_bytes
    mask_bytes = (GOLDEN / "mask.fishmask").read_bytes()
    indices, shapes, digest = maskfile.decode(mask_bytes, where="m")
    assert b"".join(maskfile.encode_v1(indices, shapes, digest)) == mask_bytes
    for step in (1, 2):
        step_bytes = (GOLDEN / "steps" / f"step-{step:012d}.fishckpt").read_bytes()
        parsed = container.parse("s", step_bytes, container.CHECKPOINT_MAGIC, what="checkpoint")
        header = {key: value for key, value in parsed.header.items() if key != "sections"}
        offset = len(step_bytes) - 16 - sum(parsed.stored_lengths)
        payloads = []
        for length in parsed.stored_lengths:
            payloads.append(step_bytes[offset : offset + length])
            offset += length
        sections = [
            Section(codec, raw_length, payload)
            for (codec, _, raw_length), payload in zip(parsed.header["sections"], payloads, strict=True)
        ]
        assert b"".join(container.pack(container.CHECKPOINT_MAGIC, header, sections)) == step_bytes


def test_format_2_manifests_and_masks_are_still_written_byte_for_byte_the_same() -> None:
    """The golden manifest and mask, read and written again, come out the same: their writers have not drifted."""
    manifest_bytes = (GOLDEN_V2 / "manifest.safetensors").read_bytes()
    parsed = manifest.parse(manifest_bytes, where="m")
    assert (parsed.version, parsed.store_id, parsed.k, parsed.numel) == (
        2,
        "18120703b80c0431c9de99691350c880",
        1435,
        4448,
    )
    assert parsed.masked_digest == "72873e4644dc3b0ba494f1b5c4eb1f27" and parsed.created == 1796048748.5688531
    assert b"".join(parsed.pack()) == manifest_bytes
    mask_bytes = (GOLDEN_V2 / "mask.safetensors").read_bytes()
    assert b"".join(Mask.from_file_bytes(mask_bytes, where="m").file_bytes()) == mask_bytes


def test_a_format_2_manifest_is_not_written_without_its_store_id_and_masked_digest() -> None:
    parsed = manifest.parse((GOLDEN_V2 / "manifest.safetensors").read_bytes(), where="m")
    for field in ("store_id", "masked_digest"):
        incomplete = dataclasses.replace(parsed, **{field: None})
        with pytest.raises(ValueError, match="^a v2 manifest needs a store id and the masked digest$"):
            incomplete.pack()
