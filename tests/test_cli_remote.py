"""The command line on stores at URLs: S3 (a real SeaweedFS server), memory:// and file://.

S3 is reached the way a user reaches it, through the environment (AWS_ENDPOINT_URL and the
keys) or through ``--storage-option``; every command gets ``--cache-dir`` so that no base is
cached in the home folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import _s3server
import click
import fsspec
import pytest
from _cli_support import Files, make_files, run, step_state
from conftest import TEST_BUCKET, assert_bits_equal
from safetensors.torch import load_file

from fishckpt_cli._options import STORAGE_OPTION
from fishckpt_cli.main import cli

URL_KINDS = ["memory-url", "file-url", "s3"]
GOLDEN_V1 = Path(__file__).resolve().parent / "data" / "store_v1"

NewUrl = Callable[[str], tuple[str, dict[str, object]]]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Files:
    """The checkpoint files, in a working folder that must stay free of stray store folders ("s3:", ...)."""
    (tmp_path / "in").mkdir()
    monkeypatch.chdir(tmp_path)
    return make_files(tmp_path / "in")


def aws_env(server: _s3server.S3Server | None, home: Path) -> dict[str, str | None]:
    """The environment a user sets for an S3-compatible server; no profile or config file of this machine leaks in."""
    env: dict[str, str | None] = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_PROFILE": None,
        "AWS_DEFAULT_PROFILE": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
    }
    if server is not None:
        env["AWS_ENDPOINT_URL"] = server.endpoint
        env["AWS_ACCESS_KEY_ID"] = _s3server.ACCESS_KEY
        env["AWS_SECRET_ACCESS_KEY"] = _s3server.SECRET_KEY
    return env


def url_store(kind: str, new_url: NewUrl, request: pytest.FixtureRequest, home: Path) -> tuple[str, dict]:
    """A fresh store URL of ``kind`` and the environment that reaches it."""
    url, _ = new_url(kind)
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    return url, aws_env(server, home)


def objects(url: str, options: dict[str, object] | None = None) -> set[str]:
    """The names under ``url``, read with fsspec directly (not through fishckpt)."""
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(options or {}))
    return {name[len(root.rstrip("/")) + 1 :] for name in fs.find(root)}


def bits_of_file(path: Path, expected: dict) -> None:
    restored = load_file(path)
    assert sorted(restored) == sorted(expected)
    for name in expected:
        assert_bits_equal(restored[name], expected[name], key=name)


@pytest.mark.parametrize("kind", URL_KINDS)
def test_init_save_ls_restore_verify_report_rm_on_a_url(
    kind: str, files: Files, new_url: NewUrl, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url, env = url_store(kind, new_url, request, tmp_path)
    cache = tmp_path / "cache"
    reach = ["--cache-dir", cache]

    result = run("init", url, "--base", files.base, "--mask", files.mask, *reach, env=env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Created store {url}: 5 tensors, ")
    options = request.getfixturevalue("s3_server").storage_options() if kind == "s3" else {}
    assert {"manifest.safetensors", "base.safetensors", "mask.safetensors"} <= objects(url, options)
    for args in (["ls", url], ["report", url], ["mask", "info", url]):
        result = run(*args, *reach, env=env)
        assert result.exit_code == 0, result.output
        assert url in result.stdout
    assert not cache.exists() or not any(cache.iterdir()), "init, ls, report, mask info download no base"

    for step in (1, 2, 3):
        result = run("save", url, files.steps[step], "--step", step, "-m", f"step {step}", *reach, env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Saved step {step} to {url}: ")
    result = run("save", url, files.steps[1], "--step", 1, *reach, env=env)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {url}: step 1 is already saved; pass --force to replace it\n",
    )

    result = run("ls", url, "--json", *reach, env=env)
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["store"] == url
    assert [(c["step"], c["message"]) for c in listing["checkpoints"]] == [(1, "step 1"), (2, "step 2"), (3, "step 3")]
    assert [c["changed_outside_mask"] for c in listing["checkpoints"]] == [0, 0, 1]
    result = run("ls", url, *reach, env=env)
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["1", "2", "3"]

    for step in (2, 3):  # step 2 holds a NaN with a payload and -0.0; step 3 a change outside the mask
        out = tmp_path / f"restored-{step}.safetensors"
        result = run("restore", url, step, "-o", out, *reach, env=env)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Restored step {step} of {url} (verified) to {out}: ")
        bits_of_file(out, step_state(step, outside=step == 3))
    # The first save downloaded the base (its exact check reads it) into --cache-dir, once for all commands.
    assert len([path for path in cache.iterdir() if not path.name.startswith(".")]) == 1

    result = run("verify", url, *reach, env=env)
    assert (result.exit_code, result.output) == (0, f"OK: the base and 3 checkpoint(s) of {url} verified.\n")
    result = run("verify", url, "--json", *reach, env=env)
    assert result.exit_code == 0, result.output
    verified = json.loads(result.stdout)
    assert (verified["store"], verified["ok"], verified["steps_checked"]) == (url, True, [1, 2, 3])

    result = run("report", url, "--json", *reach, env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["store"] == url
    sizes = {c["step"]: c["bytes"] for c in listing["checkpoints"]}
    assert {c["step"]: c["bytes"] for c in report["checkpoints"]} == sizes
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    assert report["files"]["base_bytes"] == fs.size(f"{root}/base.safetensors")
    result = run("report", url, *reach, env=env)
    assert result.exit_code == 0, result.output
    assert url in result.stdout

    result = run("rm", url, 1, 3, *reach, env=env)
    assert (result.exit_code, result.output) == (0, f"Deleted step(s) 1, 3 from {url}.\n")
    result = run("ls", url, "--json", *reach, env=env)
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == [2]
    result = run("rm", url, 3, *reach, env=env)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {url}: step(s) 3 not in the store (saved: 2); nothing was deleted\n",
    )
    assert sorted(os.listdir(tmp_path)) == sorted(["in", "cache", "restored-2.safetensors", "restored-3.safetensors"])


def test_storage_options_reach_s3_without_any_environment(
    files: Files, new_url: NewUrl, s3_server: _s3server.S3Server, tmp_path: Path
) -> None:
    """Endpoint and keys given only as --storage-option (JSON values included) reach the server."""
    url, _ = new_url("s3")
    env = aws_env(None, tmp_path)  # no AWS_* variables at all
    endpoint = json.dumps({"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"})
    reach = [
        *("--storage-option", f"key={_s3server.ACCESS_KEY}"),
        *("--storage-option", f"secret={_s3server.SECRET_KEY}"),
        *("--storage-option", f"client_kwargs={endpoint}"),
        *("--storage-option", "skip_instance_cache=true"),  # JSON true: a cached client would prove nothing
        *("--cache-dir", tmp_path / "cache"),
    ]
    result = run("init", url, "--base", files.base, "--mask", files.mask, *reach, env=env)
    assert result.exit_code == 0, result.output
    result = run("save", url, files.steps[2], "--step", 2, *reach, env=env)
    assert result.exit_code == 0, result.output
    result = run("ls", url, "--json", *reach, env=env)
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == [2]
    out = tmp_path / "restored.safetensors"
    result = run("restore", url, 2, "-o", out, *reach, env=env)
    assert result.exit_code == 0, result.output
    bits_of_file(out, step_state(2))

    # The same command without the options finds no credentials: the options were what reached it.
    result = run("ls", url, "--storage-option", "skip_instance_cache=true", env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {url}/manifest.safetensors: no credentials found")


def test_init_refuses_an_existing_url_store_and_force_replaces_it(
    files: Files, new_url: NewUrl, tmp_path: Path
) -> None:
    url, _ = new_url("memory-url")
    reach = ["--cache-dir", tmp_path / "cache"]
    assert run("init", url, "--base", files.base, "--mask", files.mask, *reach).exit_code == 0
    assert run("save", url, files.steps[1], "--step", 1, *reach).exit_code == 0
    result = run("init", url + "/", "--base", files.base, "--mask", files.mask, *reach)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {url}: already a fishckpt store; pass --force to replace it (its checkpoints are deleted)\n",
    )
    result = run("init", url, "--base", files.base, "--mask", files.mask, "--force", *reach)
    assert result.exit_code == 0, result.output
    assert json.loads(run("ls", url, "--json", *reach).stdout)["checkpoints"] == []


def test_prune_diff_and_mask_info_on_a_url(files: Files, new_url: NewUrl, tmp_path: Path) -> None:
    url, _ = new_url("memory-url")
    reach = ["--cache-dir", tmp_path / "cache"]
    assert run("init", url, "--base", files.base, "--mask", files.mask, *reach).exit_code == 0
    for step in (1, 2, 3):
        assert run("save", url, files.steps[step], "--step", step, *reach).exit_code == 0

    result = run("diff", url, 1, 3, "--json", *reach)
    assert result.exit_code == 0, result.output
    compared = json.loads(result.stdout)
    assert (compared["store"], compared["a"], compared["b"]) == (url, "step 1", "step 3")
    assert compared["totals"]["outside_mask"] == 1  # b[0], moved by step 3 only

    result = run("mask", "info", url, "--json", *reach)
    assert result.exit_code == 0, result.output
    from_store = json.loads(result.stdout)
    result = run("mask", "info", files.mask, "--json")
    from_file = json.loads(result.stdout)
    assert from_store["file"] == url
    assert {key: value for key, value in from_store.items() if key != "file"} == {
        key: value for key, value in from_file.items() if key != "file"
    }
    result = run("mask", "info", url, *reach)
    assert result.output.startswith(f"{url}: k = 9 of ")

    result = run("prune", url, "--keep-last", 1, *reach)
    assert (result.exit_code, result.output) == (0, "Deleted step(s) 1, 2; kept 3.\n")
    assert [c["step"] for c in json.loads(run("ls", url, "--json", *reach).stdout)["checkpoints"]] == [3]


def test_verify_at_a_url_names_damaged_objects(files: Files, new_url: NewUrl, tmp_path: Path) -> None:
    url, _ = new_url("memory-url")
    fs, root = fsspec.core.url_to_fs(url)
    warm = ["--cache-dir", tmp_path / "warm"]
    assert run("init", url, "--base", files.base, "--mask", files.mask, *warm).exit_code == 0
    assert run("save", url, files.steps[1], "--step", 1, *warm).exit_code == 0
    step_object = f"{root}/steps/step-000000000001.safetensors"
    data = bytearray(fs.cat_file(step_object))
    data[-1] ^= 0x01
    fs.pipe_file(step_object, bytes(data))
    result = run("verify", url, *warm)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {url}: 1 integrity problem(s)\n  {url}/steps/step-000000000001.safetensors"
    )

    # The base was cached by the save; verify reads the object on the server again, so damage
    # done there after caching is found, and the good cached copy is kept for later loads.
    base_object = f"{root}/base.safetensors"
    cached = [path for path in (tmp_path / "warm").iterdir() if not path.name.startswith(".")]
    assert len(cached) == 1
    good = cached[0].read_bytes()
    damaged = bytearray(fs.cat_file(base_object))
    damaged[len(damaged) // 2] ^= 0x10  # inside the tensor data: only the chunk digests can see it
    fs.pipe_file(base_object, bytes(damaged))
    result = run("verify", url, *warm)
    assert result.exit_code == 1
    assert f"{url}/base.safetensors" in result.stderr and "chunk" in result.stderr
    assert cached[0].read_bytes() == good, "a damaged download does not replace the cached copy"

    fs.pipe_file(base_object, fs.cat_file(base_object)[:-16])
    result = run("verify", url, "--cache-dir", tmp_path / "fresh")
    assert result.exit_code == 1
    assert f"{url}/base.safetensors: " in result.stderr
    assert not (tmp_path / "fresh").exists() or not any(
        path for path in (tmp_path / "fresh").iterdir() if not path.name.startswith(".")
    ), "a damaged download is not kept"


def test_upgrade_refuses_a_url_store_and_leaves_it_readable(new_url: NewUrl, tmp_path: Path) -> None:
    """On object storage the library's swap deletes the old store first, and its steps would be lost."""
    url, _ = new_url("memory-url")
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(str(GOLDEN_V1), root, recursive=True)
    before = objects(url)
    reach = ["--cache-dir", tmp_path / "cache"]

    result = run("upgrade", url)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {url}: a store at a URL cannot be upgraded in place (its steps would be lost); copy it to a "
        "local folder, run `fishckpt upgrade` there and copy the result to a new URL. Format 1 stores at URLs "
        "can be read (ls, restore, verify) as they are\n",
    )
    assert objects(url) == before
    assert [c["step"] for c in json.loads(run("ls", url, "--json", *reach).stdout)["checkpoints"]] == [1, 2]
    assert run("verify", url, *reach).exit_code == 0
    local = tmp_path / "store_v1"
    shutil.copytree(GOLDEN_V1, local)
    for step in (1, 2):  # the format 1 store at the URL restores what the same files restore locally
        remote_out, local_out = tmp_path / f"url-{step}.safetensors", tmp_path / f"local-{step}.safetensors"
        assert run("restore", url, step, "-o", remote_out, *reach).exit_code == 0
        assert run("restore", local, step, "-o", local_out).exit_code == 0
        bits_of_file(remote_out, load_file(local_out))


# Errors -----------------------------------------------------------------------------------------


def test_storage_option_needs_key_equals_value(files: Files) -> None:
    result = run("ls", "memory://x/store", "--storage-option", "anon")
    assert result.exit_code == 2
    assert "Invalid value for '--storage-option': 'anon' is not KEY=VALUE (e.g. profile=training, anon=true)" in (
        result.stderr
    )
    result = run("ls", "memory://x/store", "--storage-option", "client kwargs={}")
    assert result.exit_code == 2
    assert "'client kwargs' is not an option name" in result.stderr


def test_storage_option_given_twice_is_a_usage_error(files: Files) -> None:
    result = run("ls", "memory://x/store", "--storage-option", "anon=true", "--storage-option", "anon=false")
    assert result.exit_code == 2
    assert "Invalid value for '--storage-option': anon is given twice" in result.stderr


def test_storage_option_on_a_local_store_is_a_usage_error(files: Files) -> None:
    store = files.root / "store"
    assert run("init", store, "--base", files.base, "--mask", files.mask).exit_code == 0
    for args, local in (
        (["ls", store], store),
        (["save", store, files.steps[1], "--step", 1], store),
        (["mask", "info", files.mask], files.mask),
    ):
        result = run(*args, "--storage-option", "anon=true")
        assert result.exit_code == 2, args
        expected = f"applies to a store at a URL (s3://..., memory://...), not to the local path {local}"
        assert expected in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("anon=true", ("anon", True)),
        ("profile=training", ("profile", "training")),
        ("retries=3", ("retries", 3)),
        (
            'client_kwargs={"endpoint_url": "http://127.0.0.1:1"}',
            ("client_kwargs", {"endpoint_url": "http://127.0.0.1:1"}),
        ),
        ('key="0123"', ("key", "0123")),  # a JSON string stays text where the bare value would be a number
        ("secret=a=b", ("secret", "a=b")),  # only the first = splits
        ("token=", ("token", "")),
    ],
)
def test_storage_option_values_are_json_where_they_parse(text: str, expected: tuple[str, object]) -> None:
    assert STORAGE_OPTION.convert(text, None, None) == expected


def test_server_errors_reach_the_user_as_one_error_line(
    files: Files, s3_server: _s3server.S3Server, tmp_path: Path
) -> None:
    env = aws_env(s3_server, tmp_path)
    result = run("ls", "s3://no-such-bucket-fishckpt/run", env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: s3://no-such-bucket-fishckpt/run/manifest.safetensors: bucket 'no-such-bucket-fishckpt' does not exist"
    )
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    url = f"s3://{TEST_BUCKET}/wrong-key/store"
    result = run(
        "init", url, "--base", files.base, "--mask", files.mask, "--storage-option", "skip_instance_cache=true", env=env
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {url}")
    assert "access denied" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_scheme_whose_package_is_missing_names_what_to_install(files: Files) -> None:
    for args in (["ls", "gs://bucket/run"], ["init", "gs://bucket/run", "--base", files.base, "--mask", files.mask]):
        result = run(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith(
            "Error: gs://bucket/run: gs:// stores need a package that is not installed; "
            "pip install 'fishckpt[remote]' and the package fsspec names: "
        )
    assert sorted(os.listdir(".")) == ["in"], "nothing local was made of the URL"


def test_a_url_without_the_remote_extra_names_the_extra(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # `import fsspec` now fails, as without fishckpt[remote]
    for command in ("ls", "report", "verify"):
        result = run(command, "s3://bucket/run")
        assert (result.exit_code, result.stderr) == (
            1,
            "Error: s3://bucket/run: s3:// stores need fsspec; install it with pip install 'fishckpt[remote]'\n",
        )


def test_s3_without_s3fs_names_the_extra(files: Files) -> None:
    # A fresh interpreter: fsspec remembers the s3 backend once this process has loaded it.
    script = "import sys; sys.modules['s3fs'] = None; from fishckpt_cli.main import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, "ls", "s3://bucket/run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (
        1,
        "Error: s3://bucket/run: s3:// stores need a package that is not installed; pip install 'fishckpt[remote]'\n",
    )


def test_unknown_and_mangled_urls_never_become_local_folders(files: Files) -> None:
    result = run("init", "nosuch://bucket/run", "--base", files.base, "--mask", files.mask)
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: nosuch://bucket/run: no fsspec backend handles nosuch://; use s3://, file://, memory:// or a "
        "local path\n",
    )
    result = run("init", "s3:/bucket/run", "--base", files.base, "--mask", files.mask)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: s3:/bucket/run: looks like a s3:// URL that lost a slash")
    assert sorted(os.listdir(".")) == ["in"]


# Every command that takes a store takes the options -------------------------------------------


def _commands(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
    context = click.Context(group, info_name=prefix)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        yield f"{prefix} {name}".strip(), command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}".strip())


def test_every_command_on_a_store_takes_the_storage_options() -> None:
    with_store = {
        path: {option for parameter in command.params for option in parameter.opts}
        for path, command in _commands(cli, "")
        if any(parameter.name == "store_path" for parameter in command.params)
    }
    # upgrade takes local stores only (test_upgrade_refuses_a_url_store_and_leaves_it_readable).
    assert sorted(with_store) == [
        "diff", "export", "init", "ls", "mask info", "prune", "report", "restore", "rm", "save", "upgrade",
        "verify",
    ]  # fmt: skip
    assert "--storage-option" not in with_store.pop("upgrade")
    for path, options in with_store.items():
        assert {"--storage-option", "--cache-dir"} <= options, path


# ls and report stay torch-free ------------------------------------------------------------------

# Runs ls --json and report --json in a fresh interpreter where importing torch fails. A memory://
# store lives in one process, so it is filled there from a local store's files first.
NO_TORCH_SCRIPT = """
import json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked: {name} was imported")
        return None

sys.meta_path.insert(0, NoTorch())
store, copy_from = sys.argv[1], sys.argv[2]
if copy_from:
    import fsspec
    fs, root = fsspec.core.url_to_fs(store)
    fs.put(copy_from, root, recursive=True)
from fishckpt_cli._options import STORAGE_OPTION
from fishckpt_cli.main import cli
for command in ("ls", "report"):
    print(f"--- {command}")
    sys.stdout.flush()
    cli([command, store, "--json", *sys.argv[3:]], prog_name="fishckpt", standalone_mode=False)
assert "torch" not in sys.modules
"""


@pytest.mark.parametrize("kind", ["local", *URL_KINDS])
def test_ls_and_report_do_not_import_torch(
    kind: str, files: Files, new_url: NewUrl, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    local = files.root / "store"
    assert run("init", local, "--base", files.base, "--mask", files.mask).exit_code == 0
    assert run("save", local, files.steps[3], "--step", 3).exit_code == 0
    copy_from, env = "", aws_env(None, tmp_path)
    if kind == "local":
        store = str(local)
    elif kind == "memory-url":
        store, copy_from = new_url(kind)[0], str(local)
    else:
        store, env = url_store(kind, new_url, request, tmp_path)
        reach = ["--cache-dir", tmp_path / "cache"]
        assert run("init", store, "--base", files.base, "--mask", files.mask, *reach, env=env).exit_code == 0
        assert run("save", store, files.steps[3], "--step", 3, *reach, env=env).exit_code == 0
    environment = {key: value for key, value in {**os.environ, **env}.items() if value is not None}
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, store, copy_from, "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    _, listing, report = result.stdout.split("--- ")
    listing_json = json.loads(listing.removeprefix("ls\n"))
    report_json = json.loads(report.removeprefix("report\n"))
    expected_store = store if kind != "local" else str(local)
    assert (listing_json["store"], [c["step"] for c in listing_json["checkpoints"]]) == (expected_store, [3])
    assert (report_json["store"], [c["step"] for c in report_json["checkpoints"]]) == (expected_store, [3])
