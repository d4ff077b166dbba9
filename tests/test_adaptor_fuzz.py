"""Fuzz `fair adaptor inspect` (issue 22): hundreds of mutated adaptors made from one small valid adaptor.

Every mutant goes through the CLI's own ``main`` in-process (a handful also through a real ``python -m train_cli``):
each must end with exit 0 and a correct description, or exit 2 and exactly one ``error:`` line; never a traceback,
never a hang. Where the right answer is known (a data byte flipped in a hashed file, an integer tensor, a
wrong-typed ``fair.*`` value) the test asserts it; otherwise an exit 0 is checked against the mutant's own header.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fair_core.adaptor import FairAdaptor, FairMetadata, LoraWeights, SoftTokens, save_adaptor
from fair_core.adaptor.metadata import FAIR_JSON_KEYS
from fair_core.targets import TargetDistribution
from train_cli.main import main

REPO = Path(__file__).resolve().parents[1]
SEED = 22
MIN_MUTANTS = 500
HANG_SECONDS = 20  # one inspect of a 3 kB file takes milliseconds
HASH_KEY = "sshs_model_hash"
UNET = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k")
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TOKEN = "bundle_emb.fairtoken.string_to_param.*"


@dataclass
class Mutant:
    """One file to inspect and what is known of the answer: ``code`` 0/2 when known (None: either, checked by the
    oracle), ``message`` a text the error line must hold."""

    name: str
    path: Path
    code: int | None = None
    message: str | None = None


@dataclass
class Outcome:
    code: int
    out: str
    err: str


# ------------------------------------------------------------------------------------------ the valid adaptor
def valid_adaptor() -> FairAdaptor:
    """Two UNet modules and one text-encoder module of rank 2, alpha 2, and a two-vector soft token (SD1.5)."""
    generator = torch.Generator().manual_seed(SEED)

    def lora() -> LoraWeights:
        return LoraWeights(torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator), alpha=2.0)

    metadata = FairMetadata(
        base_model="sd15", name="fuzz", target=TargetDistribution.parse("gender=female:0.5,male:0.5"),
        classifier={"name": "tiny", "sha256": "ab" * 32}, training_args={"lr": 1e-4}, eval={"bias_before": 0.4},
        date="2026-12-04T00:00:00+00:00",
    )
    return FairAdaptor(
        metadata=metadata, lora={prefix: lora() for prefix in (*UNET, TE)},
        tokens=[SoftTokens("fairtoken", {"te": torch.randn(2, 8, generator=generator)})],
    )


def split(blob: bytes) -> tuple[dict, bytes]:
    """(header JSON, tensor data) of a safetensors file's bytes."""
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def join(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header (as given, any values) and data; the header padded to 8 bytes."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """The valid adaptor as written (hashed) and without its hash. The header is rewritten with sorted keys (the
    tensor data unchanged) so that mutants are the same in every run: safetensors orders metadata at random."""
    folder = tmp_path_factory.mktemp("valid")
    hashed = save_adaptor(valid_adaptor(), folder / "hashed.safetensors")
    header, data = split(hashed.read_bytes())
    header = json.loads(json.dumps(header, sort_keys=True))
    hashed.write_bytes(join(header, data))
    metadata = dict(header["__metadata__"])
    del metadata[HASH_KEY]
    unhashed = folder / "unhashed.safetensors"
    save_file(load_file(hashed), unhashed, metadata=metadata)
    return {"hashed": hashed, "unhashed": unhashed}


# ------------------------------------------------------------------------------------------ running inspect
def inspect(path: Path | str, *options: str) -> Outcome:
    """``fair adaptor inspect PATH --json OPTIONS`` through the CLI's main, in this process."""
    return run_inspect([os.fsdecode(path), "--json", *options])


def inspect_text(path: Path) -> Outcome:
    """``fair adaptor inspect PATH``: the text a terminal shows."""
    return run_inspect([os.fsdecode(path)])


def run_inspect(arguments: list[str], seconds: int = HANG_SECONDS) -> Outcome:
    """Run the CLI's main with stdout/stderr captured; a run longer than ``seconds`` is a hang and fails."""

    def hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"fair adaptor inspect {arguments} hung for {seconds} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["adaptor", "inspect", *arguments])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_line_or_description(mutant: Mutant, outcome: Outcome) -> None:
    """Exit 2 with exactly one escaped ``error:`` line and nothing on stdout, or exit 0 with a JSON description."""
    where = f"{mutant.name}: {outcome}"
    assert outcome.code in (0, 2), where
    assert "Traceback" not in outcome.err, where
    if outcome.code == 2:
        assert outcome.out == "", where
        assert outcome.err.startswith("error: ") and outcome.err.count("\n") == 1 and outcome.err.endswith("\n"), where
        assert outcome.err[:-1].isprintable(), where
    else:
        assert outcome.err == "", where
        json.loads(outcome.out)
    if mutant.code is not None:
        assert outcome.code == mutant.code, where
    if mutant.message is not None:
        assert mutant.message in outcome.err, where


def assert_describes_its_header(mutant: Mutant, outcome: Outcome) -> None:
    """An exit 0 must describe the file as its own header says: metadata, modules and ranks."""
    header, data = split(mutant.path.read_bytes())
    summary = json.loads(outcome.out)
    assert summary["metadata"] == header.get("__metadata__", {}), mutant.name
    downs = {key: entry for key, entry in header.items() if key.endswith(".lora_down.weight")}
    assert sum(summary["modules"].values()) == len(downs), mutant.name
    assert summary["ranks"] == sorted({entry["shape"][0] for entry in downs.values()}), mutant.name
    recorded = header.get("__metadata__", {}).get(HASH_KEY)
    if recorded is not None:
        assert summary["content_hash"]["verified"], mutant.name
        assert recorded.lower() == hashlib.sha256(data).hexdigest(), mutant.name
    else:
        assert not summary["content_hash"]["verified"] and summary["content_hash"]["note"], mutant.name


# ------------------------------------------------------------------------------------------ the mutants
class Maker:
    """Writes mutants into one folder, each under a fresh name."""

    def __init__(self, folder: Path, originals: dict[str, Path]) -> None:
        self.folder = folder
        self.blob = originals["hashed"].read_bytes()
        self.unhashed = originals["unhashed"].read_bytes()
        self.header, self.data = split(self.blob)
        self.tensors = load_file(originals["hashed"])
        self.mutants: list[Mutant] = []

    def add(self, name: str, content: bytes, code: int | None = None, message: str | None = None) -> Path:
        path = self.folder / f"{len(self.mutants):04d}.safetensors"
        path.write_bytes(content)
        self.mutants.append(Mutant(name, path, code, message))
        return path

    def with_header(self, name: str, change, code: int | None = None, message: str | None = None) -> None:
        header = json.loads(json.dumps(self.header))
        change(header)
        self.add(name, join(header, self.data), code, message)

    def with_tensors(self, name: str, tensors: dict, metadata: dict, code: int | None = None,
                     message: str | None = None) -> None:
        path = self.folder / f"{len(self.mutants):04d}.safetensors"
        save_file(tensors, path, metadata=metadata)
        self.mutants.append(Mutant(name, path, code, message))


def truncations(make: Maker, rng: random.Random) -> None:
    size = len(make.blob)
    header_end = size - len(make.data)
    cuts = set(range(0, size, 23)) | set(range(10)) | {header_end - 1, header_end, header_end + 1, size - 1}
    for cut in sorted(cuts):
        make.add(f"truncated to {cut} of {size} bytes", make.blob[:cut], code=2)


def header_flips(make: Maker, rng: random.Random, count: int = 160) -> None:
    header_end = len(make.blob) - len(make.data)
    for _ in range(count):
        position = rng.randrange(8, header_end)
        blob = bytearray(make.blob)
        how = rng.choice(("bit", "byte", "char"))
        if how == "bit":
            blob[position] ^= 1 << rng.randrange(8)
        elif how == "byte":
            blob[position] = rng.randrange(256)
        else:
            blob[position] = rng.choice(b'"{}[],:0 \\\n\x00\x1b9-')
        if bytes(blob) != make.blob:
            make.add(f"header byte {position} ({how})", bytes(blob))


def data_flips(make: Maker, rng: random.Random, count: int = 120) -> None:
    """Every flipped byte of tensor data in a hashed file is corruption: exit 2 naming it."""
    start = len(make.blob) - len(make.data)
    for _ in range(count):
        position = rng.randrange(start, len(make.blob))
        blob = bytearray(make.blob)
        blob[position] ^= rng.randrange(1, 256)
        make.add(f"data byte {position} flipped (hashed)", bytes(blob), code=2, message="corrupt file")


def unhashed_data_flips(make: Maker, rng: random.Random, count: int = 30) -> None:
    """Without a hash a flip can only be caught when it makes a value non-finite; the oracle says which."""
    header, data = split(make.unhashed)
    start = len(make.unhashed) - len(data)
    for _ in range(count):
        position = rng.randrange(start, len(make.unhashed))
        blob = bytearray(make.unhashed)
        blob[position] ^= rng.randrange(1, 256)
        path = make.add(f"data byte {position} flipped (no hash)", bytes(blob))
        finite = all(bool(torch.isfinite(t).all()) for t in load_file(path).values())
        make.mutants[-1].code = 0 if finite else 2


def header_lengths(make: Maker, rng: random.Random) -> None:
    length = int.from_bytes(make.blob[:8], "little")
    for value in (0, 1, 2, 7, 8, length - 1, length + 1, length + 8, len(make.blob), len(make.blob) - 8,
                  2**32, 2**63, 2**64 - 1, 100_000_001):
        make.add(f"header length {value}", value.to_bytes(8, "little") + make.blob[8:], code=2)


def offsets(make: Maker, rng: random.Random) -> None:
    keys = [key for key in make.header if key != "__metadata__"]
    down = f"{UNET[0]}.lora_down.weight"
    begin, end = make.header[down]["data_offsets"]
    for key in keys[:6]:
        b, e = make.header[key]["data_offsets"]
        for name, new in (("start+1", [b + 1, e]), ("end-1", [b, e - 1]), ("reversed", [e, b]), ("end+4", [b, e + 4]),
                          ("negative", [-1, e]), ("huge", [2**62, 2**62 + e - b]), ("strings", [str(b), str(e)]),
                          ("floats", [float(b), float(e)]), ("three", [b, e, e])):
            make.with_header(f"{key} offsets {name}", lambda h, key=key, new=new: h[key].update(data_offsets=new),
                             code=2)
    for name, change in (("no offsets", lambda h: h[down].pop("data_offsets")),
                         ("offsets null", lambda h: h[down].update(data_offsets=None)),
                         ("overlapping", lambda h: h[down].update(data_offsets=[begin, end]) or
                          h[f"{UNET[1]}.lora_down.weight"].update(data_offsets=[begin, end]))):
        make.with_header(name, change, code=2)
    other = f"{UNET[1]}.lora_down.weight"

    def swap(header: dict) -> None:  # same sizes: a valid file whose two modules trade weights
        header[down]["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"], header[down]["data_offsets"])

    make.with_header("two same-size tensors swap offsets", swap)


def shapes(make: Maker, rng: random.Random) -> None:
    down = f"{UNET[0]}.lora_down.weight"
    for shape, code in (([], 2), ([16], 2), ([4, 4], 2), ([1, 16], 2), ([16, 1], 2), ([2, 8, 1], 2), ([0, 8], 2),
                        ([2**40, 2**40], 2), ([2**32, 2**32, 2**32], 2), ([-1, 8], 2), (["2", 8], 2), ([2.0, 8], 2),
                        (None, 2), ("2,8", 2)):
        make.with_header(f"down shape {shape}", lambda h, shape=shape: h[down].update(shape=shape), code=code)
    for shape, code in (([16], 2), ([1, 16], 0), ([4, 4], 0), ([2, 4, 2], 2), ([0, 16], 2)):
        make.with_header(f"token shape {shape}", lambda h, shape=shape: h[TOKEN].update(shape=shape), code=code)
    alpha = f"{TE}.alpha"
    make.with_header("alpha shape [1]", lambda h: h[alpha].update(shape=[1]), code=0)
    make.with_header("alpha shape [1, 1, 1]", lambda h: h[alpha].update(shape=[1, 1, 1]), code=0)


def header_dtypes(make: Maker, rng: random.Random) -> None:
    """The dtype string in the header: same-size integer dtypes load and are refused by name; others do not fit."""
    down = f"{UNET[0]}.lora_down.weight"
    for dtype, code, message in (("I32", 2, f"tensor {down} has dtype int32"), ("U32", 2, f"{down} has dtype uint32"),
                                 ("F16", 2, None), ("BF16", 2, None), ("F64", 2, None), ("I64", 2, None),
                                 ("BOOL", 2, None), ("U8", 2, None), ("F8_E4M3", 2, None), ("F8_E5M2", 2, None),
                                 ("X32", 2, None), ("f32", 2, None), ("", 2, None), (32, 2, None)):
        make.with_header(f"down dtype {dtype!r}", lambda h, dtype=dtype: h[down].update(dtype=dtype), code, message)


DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float32, torch.uint16,
          torch.uint32, torch.uint64]


def retyped_token(make: Maker, rng: random.Random) -> None:
    """The token's 64 bytes declared as every dtype safetensors knows, the shape made to fit."""
    for dtype, shape, code in (("U8", [8, 8], 2), ("I8", [8, 8], 2), ("BOOL", [8, 8], 2), ("F8_E4M3", [8, 8], 2),
                               ("F8_E5M2", [8, 8], 2), ("F8_E8M0", [8, 8], 2), ("F4", [8, 16], 2),
                               ("F6_E2M3", [8, 8], 2), ("C64", [2, 4], 2), ("I16", [4, 8], 2), ("U16", [4, 8], 2),
                               ("F16", [4, 8], 0), ("BF16", [4, 8], 0), ("F64", [2, 4], 2), ("I64", [2, 4], 2),
                               ("U64", [2, 4], 2), ("U32", [2, 8], 2), ("I32", [2, 8], 2)):
        make.with_header(f"token as {dtype} {shape}", lambda h, d=dtype, s=shape: h[TOKEN].update(dtype=d, shape=s),
                         code)


def tensor_dtypes(make: Maker, rng: random.Random) -> None:
    """Tensors saved in every dtype safetensors knows: only float16, bfloat16 and float32 load."""
    metadata = {k: v for k, v in make.header["__metadata__"].items() if k != HASH_KEY}
    targets = {"down": f"{UNET[0]}.lora_down.weight", "up": f"{TE}.lora_up.weight", "alpha": f"{UNET[1]}.alpha",
               "token": TOKEN}
    for dtype in DTYPES:
        for role, key in targets.items():
            tensors = dict(make.tensors)
            tensors[key] = (tensors[key] * 4).to(dtype)
            floating = dtype in (torch.float16, torch.bfloat16, torch.float32)
            message = None if floating else f"tensor {key} has dtype {str(dtype).removeprefix('torch.')}"
            make.with_tensors(f"{role} as {dtype}", tensors, metadata, 0 if floating else 2, message)


WRONG_VALUES = ["null", "1", "1.5", "true", '"text"', "[]", "{}", "[1]", '{"a": 1}', "not json", "", "[" * 5000,
                '[{"name": "gender", "classes": ["female", 2]}]', '{"name": "x", "sha256": null}',
                '{"attributes": [{"name": "gender", "classes": ["female", "male"]}], "joint": {"female": "half"}}']


def valid_json_value(key: str, value: str) -> bool:
    """Which of :data:`WRONG_VALUES` are in fact fine for ``key``."""
    if key in ("fair.training_args", "fair.eval"):
        return value in ("{}", '{"a": 1}', '{"name": "x", "sha256": null}') or value.startswith('{"attributes"')
    if key == "fair.tokens":
        return value == "[]" or value.startswith('[{"name"')
    if key == "fair.attributes":
        return value == "[]"
    return False


def metadata_values(make: Maker, rng: random.Random) -> None:
    metadata = make.header["__metadata__"]
    for key in FAIR_JSON_KEYS:
        for value in WRONG_VALUES:
            good = valid_json_value(key, value)
            make.with_header(f"{key}={value[:30]!r}", lambda h, key=key, value=value: h["__metadata__"].update(
                {key: value}), 0 if good else 2, None if good else f"metadata {key}")
    for value, good in (("²", False), ("4.0", False), ("-1", False), ("\u0664", False), ("abc", False), ("3", False),
                        ("Dynamic", True), ("None", True), ("", True), ("2", True)):
        make.with_header(f"ss_network_dim={value!r}", lambda h, value=value: h["__metadata__"].update(
            ss_network_dim=value), 0 if good else 2, None if good else "ss_network_dim")
    for value, good in (("nan", False), ("inf", False), ("abc", False), ("1e400", False), ("2.0", True),
                        ("Dynamic", True), ("", True), (" 2", True), ("1e-3", True)):
        make.with_header(f"ss_network_alpha={value!r}", lambda h, value=value: h["__metadata__"].update(
            ss_network_alpha=value), 0 if good else 2, None if good else "ss_network_alpha")
    for key, value, code in (("fair.format_version", "2", 2), ("fair.format_version", "1\n", 2),
                             ("fair.base_model", "sdxl", 2), ("fair.base_model", "foo", 2),
                             ("ss_base_model_version", "sdxl_base_v1-0", 2), ("ss_base_model_version", "sd_v2", 2),
                             ("ss_output_name", "evil\x1b[2J\nerror: forged\u202e", 0),
                             ("modelspec.title", "x" * 100_000, 0), ("user.note", "\x00\x07\x08", 0)):
        make.with_header(f"{key}={value[:20]!r}", lambda h, key=key, value=value: h["__metadata__"].update(
            {key: value}), code)
    make.with_header("metadata not strings", lambda h: h["__metadata__"].update(ss_network_dim=2), code=2)
    make.with_header("metadata a list", lambda h: h.update(__metadata__=["a"]), code=2)
    make.with_header("no metadata at all", lambda h: h.pop("__metadata__"), code=0)
    make.with_header("hash of other data", lambda h: h["__metadata__"].update({HASH_KEY: "0" * 64}), 2, "corrupt file")
    make.with_header("hash in upper case", lambda h: h["__metadata__"].update(
        {HASH_KEY: metadata[HASH_KEY].upper()}), code=0)


def keys(make: Maker, rng: random.Random) -> None:
    down = f"{UNET[0]}.lora_down.weight"
    for new, code in ((down + "\n", 2), ("model.diffusion_model.x", 2), ("lora_unet_\x1b[2J.alpha", 2),
                      (f"{UNET[0]}.lora_mid.weight", 2), ("bundle_emb.fair\ntoken.clip_l", 2),
                      (f"{UNET[0]}_x.lora_down.weight", 2), ("lora_te1_text_model_x.lora_down.weight", 2)):
        make.with_header(f"key renamed {new!r}", lambda h, new=new: h.update({new: h.pop(down)}), code)


def huge_and_odd(make: Maker, rng: random.Random) -> None:
    make.add("a header that says 100 MB", (100_000_000).to_bytes(8, "little") + b"{" + b" " * 100, code=2)
    make.add("one tensor of 2**62 bytes", join({"a": {"dtype": "U8", "shape": [2**62], "data_offsets": [0, 2**62]}},
                                               b""), code=2)
    make.add("header is a list", join([1, 2], b""), code=2)  # type: ignore[arg-type]
    make.add("header is a string", join("x", b""), code=2)  # type: ignore[arg-type]
    make.add("empty header object", join({}, b""), code=2)
    make.add("only metadata", join({"__metadata__": {"a": "b"}}, b""), code=2)
    make.add("a pickle", pickle_bytes(make), code=2, message="not a safetensors file but a torch checkpoint")
    bare = json.dumps({k: v for k, v in make.header.items() if k != "__metadata__"}).encode()
    assert len(bare) <= 1408
    padded = bare + b" " * (1408 - len(bare))  # its length field begins b"\x80\x05", a pickle's protocol mark
    make.add("a header of 1408 bytes", (1408).to_bytes(8, "little") + padded + make.data, code=0)
    make.add("deep JSON", (20_008).to_bytes(8, "little") + b"[" * 10_000 + b"]" * 10_000 + b" " * 8, code=2)
    for index in range(40):
        length = rng.choice((1, 9, 64, 500, 4000))
        body = bytes(rng.randrange(256) for _ in range(length))
        prefix = rng.choice((len(body), rng.randrange(2**16), rng.randrange(2**64)))
        make.add(f"random bytes {index}", prefix.to_bytes(8, "little") + body, code=2)


def pickle_bytes(make: Maker) -> bytes:
    buffer = io.BytesIO()
    torch.save(make.tensors, buffer)
    return buffer.getvalue()


def special_files(make: Maker, rng: random.Random) -> None:
    """What is not a regular file gets its own message, and names are escaped."""
    folder = make.folder
    (folder / "a directory.safetensors").mkdir()
    make.mutants.append(Mutant("directory", folder / "a directory.safetensors", 2, "is a directory"))
    os.mkfifo(folder / "fifo.safetensors")
    make.mutants.append(Mutant("FIFO", folder / "fifo.safetensors", 2, "is a FIFO"))
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    make.mutants.append(Mutant("link to itself", folder / "loop.safetensors", 2, "a loop of symbolic links"))
    (folder / "ping.safetensors").symlink_to(folder / "pong.safetensors")
    (folder / "pong.safetensors").symlink_to(folder / "ping.safetensors")
    make.mutants.append(Mutant("two links in a loop", folder / "ping.safetensors", 2, "a loop of symbolic links"))
    (folder / "dangling.safetensors").symlink_to(folder / "missing.safetensors")
    make.mutants.append(Mutant("dangling link", folder / "dangling.safetensors", 2, "a symbolic link to a missing"))
    make.mutants.append(Mutant("missing", folder / "missing.safetensors", 2, "no such file"))
    make.mutants.append(Mutant("below a file", make.mutants[0].path / "x.safetensors", 2, "no such file"))
    good_link = folder / "good link.safetensors"
    good_link.symlink_to(make.add("the valid file", make.blob, code=0))
    make.mutants.append(Mutant("link to the valid file", good_link, 0))
    odd = os.fsdecode(b"caf\xe9 \xff.safetensors")
    (folder / odd).write_bytes(make.blob)
    make.mutants.append(Mutant("non-UTF-8 name", folder / odd, 0))
    (folder / os.fsdecode(b"bad \xff.safetensors")).write_bytes(make.blob[:-3])
    make.mutants.append(Mutant("non-UTF-8 name, truncated", folder / os.fsdecode(b"bad \xff.safetensors"), 2, "\\xff"))
    evil = "evil\n\x1b[31mred\u202e.safetensors"
    (folder / evil).write_bytes(make.blob)
    make.mutants.append(Mutant("control characters in the name", folder / evil, 0))
    (folder / ("bad" + evil)).write_bytes(b"")
    make.mutants.append(Mutant("control characters in a bad file's name", folder / ("bad" + evil), 2, "\\x1b[31m"))
    make.add("empty file", b"", code=2, message="empty file")


GENERATORS = (truncations, header_flips, data_flips, unhashed_data_flips, header_lengths, offsets, shapes,
              header_dtypes, retyped_token, tensor_dtypes, metadata_values, keys, huge_and_odd, special_files)


@pytest.fixture(scope="module")
def mutants(originals, tmp_path_factory) -> list[Mutant]:
    make = Maker(tmp_path_factory.mktemp("mutants"), originals)
    rng = random.Random(SEED)
    for generate in GENERATORS:
        generate(make, rng)
    return make.mutants


# ------------------------------------------------------------------------------------------ the tests
def test_every_mutant_ends_in_a_verdict_or_one_line(mutants, capsys):
    """≥ 500 mutants through the CLI in-process: exit 0 describing the file as it is, or exit 2 with one line."""
    start = time.perf_counter()
    counts = {0: 0, 2: 0}
    for mutant in mutants:
        outcome = inspect(mutant.path)
        assert_one_line_or_description(mutant, outcome)
        if outcome.code == 0 and mutant.path.is_file():
            assert_describes_its_header(mutant, outcome)
        counts[outcome.code] += 1
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nfuzz: {len(mutants)} mutants, {counts[0]} valid, {counts[2]} refused, {seconds:.1f} s")
    assert len(mutants) >= MIN_MUTANTS
    assert counts[0] >= 40 and counts[2] >= 400


def test_every_data_flip_in_a_hashed_file_is_caught(mutants):
    flips = [m for m in mutants if m.name.endswith("flipped (hashed)")]
    assert len(flips) >= 100
    for mutant in flips:
        outcome = inspect(mutant.path)
        assert outcome.code == 2 and "corrupt file" in outcome.err and HASH_KEY in outcome.err, outcome


def test_names_from_the_file_are_escaped_in_the_text_output(mutants):
    """A file named or titled with a newline and an escape sequence prints one escaped line per value."""
    evil = next(m for m in mutants if m.name == "control characters in the name")
    text = inspect_text(evil.path)
    assert text.code == 0 and "\x1b" not in text.out and "\u202e" not in text.out
    assert "file:        " + str(evil.path.parent) + "/evil\\n\\x1b[31mred\\u202e.safetensors" in text.out
    titled = next(m for m in mutants if m.name.startswith("ss_output_name="))
    text = inspect_text(titled.path)
    assert text.code == 0 and "name:        evil\\x1b[2J\\nerror: forged\\u202e\n" in text.out
    assert all(line.isprintable() for line in text.out.splitlines())
    odd = next(m for m in mutants if m.name == "non-UTF-8 name")
    assert "caf\\xe9 \\xff.safetensors" in inspect_text(odd.path).out


def test_files_without_a_hash_load_with_a_note(originals):
    text = inspect_text(originals["unhashed"])
    assert text.code == 0
    assert f"checksum:    none (note: written without {HASH_KEY}: damage to the tensor data cannot be" in text.out
    assert "checksum:    sha256 " in inspect_text(originals["hashed"]).out


def test_the_written_hash_is_kohyas_sshs_model_hash(originals):
    """kohya sd-scripts' addnet_hash_safetensors: SHA-256 of the bytes after the 8-byte length and the header."""
    blob = originals["hashed"].read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    assert header["__metadata__"][HASH_KEY] == hashlib.sha256(blob[8 + length:]).hexdigest()
    assert "sshs_legacy_hash" not in header["__metadata__"]


# ------------------------------------------------------------------------------------------ real processes
def test_real_processes_exit_with_one_line_or_quietly(mutants, originals):
    """Three through ``python -m train_cli`` (each takes seconds to start), run side by side: a corrupt file,
    a good file under a non-UTF-8 name given as bytes, and output into a closed pipe (``| head``)."""
    chosen = {
        "data byte": (next(m for m in mutants if m.name.endswith("flipped (hashed)")), 2, b"corrupt file"),
        "non-UTF-8": (next(m for m in mutants if m.name == "non-UTF-8 name"), 0, b""),
    }
    read_end, write_end = os.pipe()
    os.close(read_end)  # `inspect | head` where head has already gone: the first write gets EPIPE
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "train_cli", "adaptor", "inspect", os.fsencode(m.path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
        for name, (m, _, _) in chosen.items()
    }
    processes["broken pipe"] = subprocess.Popen(
        [sys.executable, "-m", "train_cli", "adaptor", "inspect", str(originals["hashed"])],
        stdout=write_end, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )
    os.close(write_end)
    results = {name: (process.communicate(timeout=180), process.returncode) for name, process in processes.items()}
    for name, (mutant, code, message) in chosen.items():
        (out, err), returncode = results[name]
        assert returncode == code, (name, out, err)
        assert b"Traceback" not in err, (name, err)
        if code == 2:
            assert err.startswith(b"error: ") and err.count(b"\n") == 1 and message in err, (name, err)
        else:
            assert err == b"" and b"base model:  sd15" in out, (name, err)
    (_, err), returncode = results["broken pipe"]
    assert returncode == 0 and err == b"", err
