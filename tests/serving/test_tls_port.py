"""--ssl_config_file: TF Serving's SSLConfig, TLS on the gRPC port (REST stays plain HTTP, as in TF Serving)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format

from carclf.clients import connect
from carclf.errors import ConfigError, Unavailable
from carclf.serving import protos
from carclf.serving.config import parse_ssl_config
from tests.serving.conformance_setup import OTHER_MODEL
from tests.serving.conftest import Rest


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM texts: a private CA, a server certificate for 127.0.0.1 and a client certificate, both signed by
    it, and a self-signed client certificate the CA never saw."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=carclf test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", str(d / f"{who}.key"),
                 "-out", str(d / f"{who}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(d / "san.ext"), "-out", str(d / f"{who}.pem"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger",
             "-keyout", str(d / "stranger.key"), "-out", str(d / "stranger.pem"))
    return {p.name: p.read_text() for p in d.iterdir() if p.suffix in (".pem", ".key")}


def ssl_config_file(folder: Path, **fields) -> Path:
    """An SSLConfig text proto as TF Serving reads it (the PEM texts in its string fields)."""
    path = folder / "ssl.config"
    path.write_text(text_format.MessageToString(protos.SSLConfig(**fields)))
    return path


def serve_with_tls(private_server, repository: Path, config: Path):
    return private_server(model_name=OTHER_MODEL, model_base_path=str(repository / OTHER_MODEL),
                          enable_model_warmup=False, ssl_config_file=str(config))


def test_the_grpc_port_speaks_tls_from_an_ssl_config_file(private_server, conformance_repository, pki, tmp_path,
                                                         jpegs):
    """A client trusting the CA predicts over grpcs://; a plaintext client is refused; REST is plain HTTP."""
    config = ssl_config_file(tmp_path, server_key=pki["server.key"], server_cert=pki["server.pem"])
    server = serve_with_tls(private_server, conformance_repository, config)
    target = f"127.0.0.1:{server.grpc_port}"
    with connect(f"grpcs://{target}", timeout=10, root_certificates=pki["ca.pem"].encode()) as client:
        probabilities = client.predict(OTHER_MODEL, images=[jpegs[0]]).outputs["probabilities"]
    assert probabilities.shape[0] == 1 and abs(float(probabilities.sum()) - 1.0) < 1e-4
    with connect(f"grpc://{target}", timeout=5) as plaintext, pytest.raises(Unavailable):
        plaintext.status(OTHER_MODEL)
    assert Rest(f"http://127.0.0.1:{server.rest_port}").get(f"/v1/models/{OTHER_MODEL}").status == 200


def test_client_verify_admits_only_client_certificates_signed_by_custom_ca(private_server, conformance_repository,
                                                                         pki, tmp_path):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    config = ssl_config_file(tmp_path, server_key=pki["server.key"], server_cert=pki["server.pem"],
                             custom_ca=pki["ca.pem"], client_verify=True)
    server = serve_with_tls(private_server, conformance_repository, config)

    def status(key: str | None, cert: str | None):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki["ca.pem"].encode(), private_key=key.encode() if key else None,
            certificate_chain=cert.encode() if cert else None)
        with grpc.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials) as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = OTHER_MODEL
            return model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=5)

    assert status(pki["client.key"], pki["client.pem"]).model_version_status[0].state == \
        get_model_status_pb2.ModelVersionStatus.AVAILABLE
    for key, cert in ((None, None), (pki["stranger.key"], pki["stranger.pem"])):
        with pytest.raises(grpc.RpcError) as refused:
            status(key, cert)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("fields,field,needle", [
    ({"server_cert": "server.pem"}, "server_key", "is empty; it holds the PEM text itself"),
    ({"server_key": "/etc/tls/server.key", "server_cert": "server.pem"}, "server_key",
     "is not PEM text (expected -----BEGIN ...); it holds the key or certificate itself, not a path"),
    ({"server_key": "server.key", "server_cert": "/etc/tls/server.pem"}, "server_cert",
     "is not PEM text (expected -----BEGIN ..., received '/etc/tls/server.pem')"),
    ({"server_key": "stranger.key", "server_cert": "server.pem"}, "server_cert",
     "server_key and server_cert are not a usable key and certificate pair"),
    ({"server_key": "server.key", "server_cert": "server.pem", "client_verify": True}, "custom_ca",
     "client_verify: true needs custom_ca"),
    ({"server_key": "server.key", "server_cert": "server.pem", "custom_ca": "-----BEGIN CERTIFICATE-----\nno\n"},
     "custom_ca", "holds no usable PEM certificate"),
])
def test_an_ssl_config_that_tls_cannot_use_is_refused_naming_the_field(pki, tmp_path, fields, field, needle):
    """Checked when the server starts, before any model loads, with what is wrong (gRPC itself would only
    fail to bind the port)."""
    values = {k: (pki[v] if isinstance(v, str) and v in pki else v) for k, v in fields.items()}
    config = ssl_config_file(tmp_path, **values)
    with pytest.raises(ConfigError) as refused:
        parse_ssl_config(config.read_text(), source=str(config))
    assert refused.value.source == str(config) and refused.value.field == field
    assert needle in refused.value.detail
    assert "PRIVATE KEY" not in refused.value.message and "/etc/tls/server.key" not in refused.value.message


def test_carclf_serve_refuses_a_bad_ssl_config_before_loading_models(conformance_repository, tmp_path):
    """`carclf serve --ssl_config_file` with text that is no SSLConfig: exit 2, one line naming the file."""
    import sys

    bad = tmp_path / "ssl.config"
    bad.write_text('server_key: "x"\nno_such_field: 1\n')
    result = subprocess.run([sys.executable, "-m", "carclf", "serve", "--port", "0", "--rest_api_port", "0",
                             "--model_name", OTHER_MODEL, "--model_base_path", str(conformance_repository / OTHER_MODEL),
                             "--ssl_config_file", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "not a valid SSLConfig text proto" in last and "no_such_field" in last
    assert f"loading {OTHER_MODEL} version" not in result.stderr  # refused before any model loads
