"""TLS with private root certificates: the served API behind grpcs:// and https:// (a self-signed CA)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading

import numpy as np
import pytest

from carclf.clients import connect
from carclf.errors import CarClfError, Unavailable
from tests.ensemble.servers import grpc_url, rest_url


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """(certificate PEM, key PEM) for 127.0.0.1, self-signed by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert.read_bytes(), key.read_bytes(), cert, key


@pytest.fixture(scope="module")
def tls_ports(tiny_ensemble_server, certificate):
    """The shared server's gRPC services and REST API again, on TLS ports of their own."""
    import grpc
    from aiohttp import web

    from carclf.serving.grpc_service import add_services
    from carclf.serving.rest import RestApi

    cert_pem, key_pem, cert_file, key_file = certificate
    server = tiny_ensemble_server
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def start():
        grpc_server = grpc.aio.server()
        add_services(grpc_server, server.predictor, server.manager, server.resolver, server.gate)
        state["grpc"] = grpc_server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
        await grpc_server.start()
        api = RestApi(server.predictor, server.manager, server.gate, monitoring=server.monitoring,
                      max_request_bytes=server.options.max_request_bytes, timeout_ms=30000, executor=server.executor)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        runner = web.AppRunner(api.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        state.update(grpc_server=grpc_server, runner=runner, rest=runner.addresses[0][1])
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield state["grpc"], state["rest"]

    async def stop():
        await state["grpc_server"].stop(0)
        await state["runner"].cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_tls_with_private_root_certificates(tls_ports, certificate, tiny_ensemble_server, photos):
    grpc_port, rest_port = tls_ports
    images = [photos[0].read_bytes()]
    with connect(grpc_url(tiny_ensemble_server)) as plain:
        want = plain.predict("tiny_a", images=images).probabilities
    for url in (f"grpcs://127.0.0.1:{grpc_port}", f"https://127.0.0.1:{rest_port}"):
        with connect(url, root_certificates=certificate[0], timeout=20) as client:
            np.testing.assert_allclose(client.predict("tiny_a", images=images).probabilities, want, rtol=1e-6)
        with connect(url, timeout=5) as untrusting, pytest.raises(Unavailable) as refused:  # system roots: refused
            untrusting.status("tiny_a")
        assert "TLS certificate verification" in refused.value.message, refused.value.message
        assert "pass the server's root certificates" in refused.value.message
    # grpc:// to the TLS port: the server closes the plaintext connection, and the error says TLS may be why
    with connect(f"grpc://127.0.0.1:{grpc_port}", timeout=5) as plain, pytest.raises(Unavailable) as refused:
        plain.status("tiny_a")
    assert refused.value.message.endswith(f"(server 127.0.0.1:{grpc_port}; a port that requires TLS closes "
                                          "plaintext connections like this: give grpcs://host:port if it is one)")


def test_grpcs_without_root_certificates_speaks_tls_and_a_plaintext_port_refuses_it(tiny_ensemble_server):
    """grpcs:// means TLS even when no --root-cert is given (the system roots then): pointed at a plaintext
    gRPC port, the handshake fails and the call is Unavailable, never answered in clear text; the error says to
    give grpc://. https:// to the plain REST port likewise says to give http://."""
    port = grpc_url(tiny_ensemble_server).rsplit(":", 1)[1]
    with connect(f"grpc://127.0.0.1:{port}", timeout=10) as plain:
        assert plain.status("tiny_a")  # the port answers plaintext gRPC
    with connect(f"grpcs://127.0.0.1:{port}", timeout=10) as client, pytest.raises(Unavailable) as refused:
        client.status("tiny_a")
    assert refused.value.message == (f"127.0.0.1:{port} does not answer TLS, as a plaintext gRPC port does: give "
                                     "grpc://host:port for it")
    rest_port = rest_url(tiny_ensemble_server).rsplit(":", 1)[1]  # and https:// to the plain REST port
    with connect(f"https://127.0.0.1:{rest_port}", timeout=10) as client, pytest.raises(Unavailable) as refused:
        client.status("tiny_a")
    assert refused.value.message == (f"cannot reach https://127.0.0.1:{rest_port}: it does not answer TLS, as a "
                                     "plain HTTP port does: give http://host:port for it")


def test_root_certificates_given_mean_tls_on_either_transport(tiny_ensemble_server, certificate):
    """Root certificates given (`--root-cert`) mean TLS: grpc:// with them speaks TLS, so a plaintext gRPC port
    fails the handshake. http:// with them must not quietly send the photos in clear text instead (refused,
    or TLS as for gRPC); it answered from the plaintext REST port as if no certificate had been given."""
    for url in (grpc_url(tiny_ensemble_server), rest_url(tiny_ensemble_server)):
        with pytest.raises(CarClfError):
            with connect(url, root_certificates=certificate[0], timeout=10) as client:
                client.status("tiny_a")
