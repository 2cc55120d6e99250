"""`semsearch search` as a user runs it (a separate process) against a real service over loopback:
API keys, TLS and mutual TLS, the server's default top_k, `--version` and `--help`, and every user
mistake ending in one `error:` line with a non-zero exit code and no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from semsearch.config import ApiKey
from semsearch.encoders import TorchEncoder
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService, free_port

REPO = Path(__file__).resolve().parent.parent
READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
KEYS = [
    ApiKey(name="reader", key=READ_KEY, scope="search"),  # type: ignore[arg-type]
    ApiKey(name="writer", key=WRITE_KEY, scope="write"),  # type: ignore[arg-type]
]
DOCS = [("refund", "如何申请退款？"), ("invoice", "发票抬头写错能改吗"), ("parcel", "快递包裹几天没动静"),
        ("password", "密码忘记了怎么找回"), ("battery", "手机电池发热")]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # A user's environment: no SEMSEARCH_* settings leak in from the test process, a wide terminal.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEMSEARCH_")}
    return subprocess.run([sys.executable, "-m", "semsearch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**base, "COLUMNS": "200", **(env or {})})


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> str:
    """A user mistake: exit code `code`, and stderr ends in one `error:` line naming the problem."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no message at all"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def hit_ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [hit["id"] for hit in json.loads(result.stdout)["hits"]]


def fill(service: LiveService, metadata: list[tuple[str, str]] | None = None) -> None:
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
        documents=[pb.Document(id=i, text=t) for i, t in DOCS]), timeout=60, metadata=metadata or [])


# ---------------------------------------------------------------------------------------------
# API keys


def test_search_with_an_api_key(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                                tmp_path: Path) -> None:
    service = make_service(tiny_encoder, api_keys=KEYS)
    fill(service, [("authorization", f"Bearer {WRITE_KEY}")])
    address = service.address
    assert "refund" in hit_ids(cli("search", "退钱怎么操作？", "--addr", address, "--api-key", READ_KEY, "--json"))
    # The variable works too, and a flag wins over it.
    assert hit_ids(cli("search", "退款", "--addr", address, "--json", env={"SEMSEARCH_API_KEY": READ_KEY}))
    assert hit_ids(cli("search", "退款", "--addr", address, "--json", "--api-key", READ_KEY,
                       env={"SEMSEARCH_API_KEY": "stale-key"}))
    # ...and the YAML settings file (same name everywhere).
    config = tmp_path / "client.yaml"
    config.write_text(f"api_key: {READ_KEY}\n", encoding="utf-8")
    assert hit_ids(cli("search", "退款", "--addr", address, "--json", "--config", str(config)))

    missing = cli("search", "退款", "--addr", address)
    assert_one_error_line(missing, "requires an API key", "--api-key", "SEMSEARCH_API_KEY", address)
    wrong = cli("search", "退款", "--addr", address, "--api-key", "not-the-key")
    line = assert_one_error_line(wrong, "refused the API key", "invalid API key", address)
    assert "not-the-key" not in line  # the key itself is never echoed
    assert wrong.stdout == ""


def test_search_pages_thresholds_and_tenants_from_the_command_line(
        make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder)
    fill(service)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
        documents=[pb.Document(id="acme-only", text="如何申请退款？", tenant="acme")]), timeout=60)
    address = service.address
    first = cli("search", "如何申请退款？", "--addr", address, "--page-size", "2", "--json")
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert len(page["hits"]) == 2 and page["next_page_token"]
    second = hit_ids(cli("search", "如何申请退款？", "--addr", address, "--page-size", "2",
                         "--page-token", page["next_page_token"], "--json"))
    assert second and not set(second) & {hit["id"] for hit in page["hits"]}
    assert "acme-only" not in [*second, *(hit["id"] for hit in page["hits"])]  # another tenant's document
    assert hit_ids(cli("search", "如何申请退款？", "--addr", address, "--tenant", "acme", "--json")) == ["acme-only"]
    assert hit_ids(cli("search", "如何申请退款？", "--addr", address, "--min-score", "2", "--json")) == []
    forged = cli("search", "如何申请退款？", "--addr", address, "--page-size", "2", "--page-token", "forged")
    assert_one_error_line(forged, "page_token")


# ---------------------------------------------------------------------------------------------
# TLS and mutual TLS


def test_search_over_tls(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                         pki: dict[str, Path], tmp_path: Path) -> None:
    service = make_service(tiny_encoder, tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                           api_keys=KEYS, milvus_uri=str(tmp_path / "tls.db"))
    fill_over_tls(service, pki, [("authorization", f"Bearer {WRITE_KEY}")])
    port = str(service.running.port)
    ok = cli("search", "退款", "--host", "localhost", "--port", port, "--tls-ca-file", str(pki["ca.pem"]),
             "--api-key", READ_KEY, "--json")
    assert "refund" in hit_ids(ok)
    # An IP address with --tls-server-name (the name in the certificate).
    assert hit_ids(cli("search", "退款", "--addr", f"127.0.0.1:{port}", "--tls-ca-file", str(pki["ca.pem"]),
                       "--tls-server-name", "localhost", "--api-key", READ_KEY, "--json"))

    plaintext = cli("search", "退款", "--addr", f"localhost:{port}", "--api-key", READ_KEY)
    assert_one_error_line(plaintext, f"localhost:{port}", "--tls-ca-file")
    wrong_ca = cli("search", "退款", "--addr", f"localhost:{port}", "--tls-ca-file", str(pki["other-ca.pem"]),
                   "--api-key", READ_KEY)
    assert_one_error_line(wrong_ca, "TLS", "not signed by the CA in --tls-ca-file")
    wrong_name = cli("search", "退款", "--addr", f"127.0.0.1:{port}", "--tls-ca-file", str(pki["ca.pem"]),
                     "--tls-server-name", "search.example.com", "--api-key", READ_KEY)
    assert_one_error_line(wrong_name, "does not name search.example.com", "--tls-server-name")
    no_file = cli("search", "退款", "--addr", f"localhost:{port}", "--tls-ca-file", str(tmp_path / "nope.pem"))
    assert_one_error_line(no_file, "--tls-ca-file", "nope.pem", code=2)
    half = cli("search", "退款", "--addr", f"localhost:{port}", "--tls-ca-file", str(pki["ca.pem"]),
               "--tls-client-cert-file", str(pki["client.pem"]))
    assert_one_error_line(half, "--tls-client-key-file", code=2)


def fill_over_tls(service: LiveService, pki: dict[str, Path], metadata: list[tuple[str, str]],
                  client_cert: bool = False) -> None:
    import grpc

    from semsearch.v1 import search_pb2_grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca.pem"].read_bytes(),
        private_key=pki["client.key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client.pem"].read_bytes() if client_cert else None)
    with grpc.secure_channel(f"localhost:{service.running.port}", credentials) as channel:
        search_pb2_grpc.SearchServiceStub(channel).UpsertDocuments(pb.UpsertDocumentsRequest(
            documents=[pb.Document(id=i, text=t) for i, t in DOCS]), timeout=60, metadata=metadata)


def test_search_over_mutual_tls(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
                                pki: dict[str, Path], tmp_path: Path) -> None:
    service = make_service(tiny_encoder, tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                           tls_client_ca_file=pki["ca.pem"], milvus_uri=str(tmp_path / "mtls.db"))
    fill_over_tls(service, pki, [], client_cert=True)
    address = f"localhost:{service.running.port}"
    with_cert = cli("search", "退款", "--addr", address, "--tls-ca-file", str(pki["ca.pem"]),
                    "--tls-client-cert-file", str(pki["client.pem"]),
                    "--tls-client-key-file", str(pki["client.key"]), "--json")
    assert "refund" in hit_ids(with_cert)
    # The same through the environment, as a Kubernetes Job would pass them.
    env = {"SEMSEARCH_TLS_CA_FILE": str(pki["ca.pem"]), "SEMSEARCH_TLS_CLIENT_CERT_FILE": str(pki["client.pem"]),
           "SEMSEARCH_TLS_CLIENT_KEY_FILE": str(pki["client.key"])}
    assert hit_ids(cli("search", "退款", "--addr", address, "--json", env=env))
    without_cert = cli("search", "退款", "--addr", address, "--tls-ca-file", str(pki["ca.pem"]))
    assert_one_error_line(without_cert, address, "--tls-client-cert-file")


# ---------------------------------------------------------------------------------------------
# The server's default top_k, unreachable servers, bad settings files


def test_top_k_left_unset_uses_the_servers_default(make_service: Callable[..., LiveService],
                                                   tiny_encoder: TorchEncoder) -> None:
    service = make_service(tiny_encoder, default_top_k=2)
    fill(service)
    assert len(hit_ids(cli("search", "退款", "--addr", service.address, "--json"))) == 2
    assert len(hit_ids(cli("search", "退款", "--addr", service.address, "--json", "--top-k", "4"))) == 4
    negative = cli("search", "退款", "--addr", service.address, "--top-k", "-1")
    assert_one_error_line(negative, "INVALID_ARGUMENT", "top_k")


def test_unreachable_service_is_one_line() -> None:
    port = free_port()  # nothing listens there
    result = cli("search", "退款", "--addr", f"127.0.0.1:{port}", "--timeout", "5")
    assert_one_error_line(result, f"127.0.0.1:{port}", "cannot reach the service", "semsearch serve", "--addr")
    by_host = cli("search", "退款", "--host", "127.0.0.1", "--port", str(port), "--timeout", "5")
    assert_one_error_line(by_host, f"127.0.0.1:{port}")


def test_search_calls_semsearch_addr_never_the_bind_host() -> None:
    """SEMSEARCH_HOST/PORT say where `serve` binds (0.0.0.0 in a pod): `search` calls SEMSEARCH_ADDR."""
    port = free_port()  # nothing listens there
    env = {"SEMSEARCH_HOST": "bind.invalid", "SEMSEARCH_PORT": "1", "SEMSEARCH_ADDR": f"127.0.0.1:{port}"}
    result = cli("search", "退款", "--timeout", "5", env=env)
    assert_one_error_line(result, f"cannot reach the service at 127.0.0.1:{port}")
    flag = cli("search", "退款", "--timeout", "5", "--port", str(free_port()), env=env)  # a flag beats the variable
    assert "bind.invalid" not in flag.stderr and f"127.0.0.1:{port}" not in flag.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (["search", "退款", "--topk", "3"], ["no such option --topk", "did you mean --top-k?"]),
    (["search", "退款", "--top-k", "abc"], ["'--top-k'", "integer"]),
    (["search"], ["Missing argument", "query"]),
    (["serch", "退款"], ["No such command 'serch'", "search"]),
    (["promote", "m", "--colection", "faq"], ["no such option --colection", "did you mean --collection?"]),
    (["index", "run", "x.jsonl", "--shard"], ["--shard"]),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], fragments: list[str]) -> None:
    result = cli(*args)
    assert_one_error_line(result, *fragments, code=2)
    assert "Usage:" not in result.stderr and "╭" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", [[], ["search"], ["serve"], ["promote"], ["train", "evaluate"], ["index", "run"]])
def test_dash_h_is_help(command: list[str]) -> None:
    result = cli(*command, "-h")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--help" in result.stdout


def test_settings_file_mistakes_are_one_line(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("collection: faq\nmax_topk: 5\n", encoding="utf-8")
    for how in (["--config", str(typo)], []):
        result = cli("search", "退款", *how, env={} if how else {"SEMSEARCH_CONFIG": str(typo)})
        assert_one_error_line(result, f"{typo}:2", "unknown setting 'max_topk'", "did you mean 'max_top_k'", code=2)
    bad_env = cli("serve", env={"SEMSEARCH_PORT": "many"})
    assert_one_error_line(bad_env, "setting port", "SEMSEARCH_PORT", code=2)


def test_settings_file_errors_name_the_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The messages the commands print (the process-level path is the same as above)."""
    from semsearch.config import SettingsError, load_settings

    for var in [v for v in os.environ if v.startswith("SEMSEARCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SEMSEARCH_CONFIG", "")  # load_settings sets it: monkeypatch removes it afterwards
    cases = {
        "broken.yaml": ("collection: [faq\n", ["broken.yaml:2", "not valid YAML"]),
        "type.yaml": ("port: fifty\n", ["setting port", "fifty", "SEMSEARCH_PORT", "type.yaml"]),
        "list.yaml": ("- collection\n", ["list.yaml", "mapping"]),
        "far.yaml": ("collection: a\n\n\nzzz: 1\n", ["far.yaml:4", "unknown setting 'zzz'", "semsearch/config.py"]),
    }
    for name, (text, fragments) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SettingsError) as raised:
            load_settings(path)
        message = str(raised.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
        monkeypatch.delenv("SEMSEARCH_CONFIG")
    with pytest.raises(SettingsError, match=r"absent\.yaml"):
        load_settings(tmp_path / "absent.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("collection: faq\napi_key: k\n", encoding="utf-8")
    settings = load_settings(good)
    assert settings.collection == "faq" and settings.api_key is not None


def test_serve_refuses_a_collection_of_another_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Tiny models: one `semsearch serve` process that stops at the check (~15 s, mostly imports).
    from semsearch.store import MilvusStore, versioned_name
    from tests.tinymodel import build_tiny_bert

    lite = tmp_path / "milvus.db"
    store = MilvusStore(str(lite))
    manifest = TorchEncoder.from_ref(str(tiny_model_dir), device="cpu").manifest
    store.ensure_collection(versioned_name("faq", manifest.version), manifest)
    store.point_alias("faq", versioned_name("faq", manifest.version))
    store.close()
    other = build_tiny_bert(tmp_path / "other-model", seed=7)
    result = cli("serve", "--model", str(other), "--collection", "faq", "--milvus-uri", str(lite),
                 "--port", str(free_port()), env={"SEMSEARCH_USE_REGISTRY": "false", "SEMSEARCH_METRICS_PORT": "0"},
                 timeout=300)
    assert_one_error_line(result, "faq__", manifest.version, "tiny-zh-bert-seed7", "Re-index")


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--model", str(tiny_model_dir), "--milvus-uri", str(tmp_path / "m.db"),
                     "--port", str(port), env={"SEMSEARCH_METRICS_PORT": "0"}, timeout=300)
    assert_one_error_line(result, f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------------------------
# --version and --help


def test_version() -> None:
    from semsearch.cli import package_version

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"semsearch {package_version()}"
    assert re.fullmatch(r"semsearch \d+\.\d+\.\d+\S*", result.stdout.strip())


@pytest.mark.parametrize("command", ["serve", "search", "index"])
def test_help_shows_the_environment_variables(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "[env SEMSEARCH_CONFIG]" in text
    hints = re.findall(r"\[env (SEMSEARCH_[A-Z_]+)\]", text)
    assert len(hints) >= 2, text
    from semsearch.config import Settings

    for hint in hints:  # every hint names a real setting
        assert hint == "SEMSEARCH_CONFIG" or hint.removeprefix("SEMSEARCH_").lower() in Settings.model_fields, hint
    if command == "search":
        for flag in ("--api-key", "--tls-ca-file", "--tls-client-cert-file", "--tls-client-key-file"):
            assert flag in text
        assert "[env SEMSEARCH_API_KEY]" in text and "[env SEMSEARCH_ADDR]" in text
        # --host/--port of search name the service to call; SEMSEARCH_HOST/PORT are serve's bind address.
        assert "[env SEMSEARCH_HOST]" not in text and "[env SEMSEARCH_PORT]" not in text
        host_help = next(line for line in text.splitlines() if re.search(r"--host\s", line))
        assert "Bind" not in host_help and "service to call" in host_help
        top_k_help = next(line for line in text.splitlines() if re.search(r"--top-k\s", line))
        assert "default_top_k" in top_k_help


def test_a_refused_promotion_exits_3_not_1() -> None:
    """3: the command declined and changed nothing (gate, validation, state, another writer); 1: failed."""
    from semsearch.errors import BackendUnavailableError, ConflictError
    from semsearch.promotion import PromotionError
    from trainer.promotion_cli import exit_code

    assert exit_code(PromotionError("validation failed: 76 rows live vs 75")) == 3
    assert exit_code(ConflictError("another writer changed it; re-read and retry")) == 3
    assert exit_code(BackendUnavailableError("Milvus is down")) == 1
