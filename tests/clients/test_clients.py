"""GrpcClient and RestClient: one interface, the same answers and the same errors for the same requests."""

from __future__ import annotations

import base64
import socket

import numpy as np
import pytest

from carclf.clients import GrpcClient, ModelClient, RestClient, connect, parse_server_url
from carclf.clients.base import as_input_array
from carclf.clients.rest_client import encode_value
from carclf.errors import CarClfError, DeadlineExceeded, InvalidInput, NotFound, Unavailable
from carclf.tensors import to_ndarray
from tests.ensemble.servers import grpc_url, rest_url


@pytest.fixture(scope="module")
def clients(tiny_ensemble_server):
    grpc_client, rest_client = connect(grpc_url(tiny_ensemble_server)), connect(rest_url(tiny_ensemble_server))
    yield grpc_client, rest_client
    grpc_client.close()
    rest_client.close()


def test_connect_picks_the_transport(tiny_ensemble_server):
    with connect(grpc_url(tiny_ensemble_server)) as g, connect(rest_url(tiny_ensemble_server)) as r:
        assert isinstance(g, GrpcClient) and isinstance(r, RestClient)
        assert isinstance(g, ModelClient) and isinstance(r, ModelClient)


@pytest.mark.parametrize("url,expected", [
    ("grpc://host:9000", ("grpc", "host:9000", False)),
    ("grpc://host", ("grpc", "host:8500", False)),
    ("grpcs://host:443", ("grpc", "host:443", True)),
    ("http://host", ("rest", "http://host:8501", False)),
    ("https://host/prefix/", ("rest", "https://host:443/prefix", True)),
    ("grpc://[::1]:8500", ("grpc", "[::1]:8500", False)),
    ("http://[::1]:8501", ("rest", "http://[::1]:8501", False)),
    ("https://[fd00::5]", ("rest", "https://[fd00::5]:443", True)),
])
def test_server_urls(url, expected):
    assert parse_server_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://host", "grpc://", "http://host:notaport", "host:8500"])
def test_bad_server_urls(url):
    with pytest.raises(InvalidInput, match="server address"):
        parse_server_url(url)


def test_same_answers_over_grpc_and_rest(clients, photos):
    images = [p.read_bytes() for p in photos[:3]]
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    for model, kwargs in [
        ("tiny_a", {"images": images}),
        ("tiny_a", {"images": images, "version": 1}),
        ("tiny_b", {"inputs": {"pixels": pixels}, "signature_name": "serving_pixels"}),
        ("tiny_ensemble", {"images": images}),
        ("tiny_a", {"images": images, "output_filter": ("label",)}),
    ]:
        a, b = (c.predict(model, **kwargs) for c in clients)
        assert a.outputs.keys() == b.outputs.keys(), model
        for name in a.outputs:
            if name.endswith("latency_ms"):
                continue  # timings differ from call to call
            x, y = np.asarray(a.outputs[name]), np.asarray(b.outputs[name])
            assert x.shape == y.shape and x.dtype.kind == y.dtype.kind, (model, name)
            if x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
            else:
                assert x.tolist() == y.tolist(), (model, name)
        if "probabilities" in a.outputs:
            for row_a, row_b in zip(a.top_k(3), b.top_k(3), strict=True):
                assert [n for n, _ in row_a] == [n for n, _ in row_b]
                assert [p for _, p in row_a] == pytest.approx([p for _, p in row_b], rel=1e-6)
    # gRPC reports the version that answered; REST (like TF Serving) reports none unless one was asked for
    assert clients[0].predict("tiny_a", images=images[:1]).version == 2
    assert clients[1].predict("tiny_a", images=images[:1], version=1).version == 1


def test_same_metadata_and_status(clients):
    for model in ("tiny_a", "tiny_ensemble"):
        g, r = (c.metadata(model) for c in clients)
        assert g.signatures == r.signatures and g.model_name == r.model_name == model
        assert [c.status(model) for c in clients][0] == [c.status(model) for c in clients][1]
    assert [(s.version, s.state) for s in clients[0].status("tiny_a")] == [(2, "AVAILABLE"), (1, "AVAILABLE")]


BAD_REQUESTS = [
    ("unknown model", "nope", {"images": None}, NotFound),
    ("unknown version", "tiny_a", {"images": None, "version": 9}, NotFound),
    ("unknown label", "tiny_a", {"images": None, "version_label": "nolabel"}, InvalidInput),
    ("not an image", "tiny_a", {"images": [b"GIF89a but not really"]}, InvalidInput),
    ("empty photo", "tiny_ensemble", {"images": [b""]}, InvalidInput),
    ("wrong input name", "tiny_a", {"inputs": {"photo": np.array([b"x"], dtype=object)}}, InvalidInput),
    ("unknown output", "tiny_a", {"images": None, "output_filter": ("logits",)}, InvalidInput),
]
# TF Serving's REST API has no output_filter: RestClient applies it and raises the same type, its own words.
CLIENT_SIDE_MESSAGE = {"unknown output"}


@pytest.mark.parametrize("what,model,kwargs,error", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_same_error_type_and_message_for_the_same_bad_request(clients, photos, what, model, kwargs, error):
    if kwargs.get("images", 1) is None:
        kwargs = {**kwargs, "images": [photos[0].read_bytes()]}
    caught = []
    for client in clients:
        with pytest.raises(CarClfError) as info:
            client.predict(model, **kwargs)
        caught.append(info.value)
    g, r = caught
    assert type(g) is type(r) is error and g.code == r.code
    if what not in CLIENT_SIDE_MESSAGE:
        assert g.message == r.message  # the server's own message, whatever the transport
    assert what not in CLIENT_SIDE_MESSAGE or ("logits" in g.message and "logits" in r.message)


def test_unreachable_server_is_unavailable_on_both():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url in (f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with connect(url, timeout=5) as client, pytest.raises(Unavailable):
            client.status("tiny_a")


def test_a_server_that_never_answers_is_named_with_the_time_waited_on_both():
    """A hung server (it accepts the connection, then says nothing): the client's own deadline ends the call,
    and the error says which server did not answer within what time, not only grpc's "Deadline Exceeded"."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        for url in (f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
            with connect(url, timeout=0.5) as client, pytest.raises(DeadlineExceeded) as caught:
                client.status("tiny_a")
            assert f"no answer from {client.target} within 0.5 s" == caught.value.message


def test_a_url_of_the_other_transport_says_which_scheme_to_give(tiny_ensemble_server):
    """http:// to the gRPC port, or grpc:// to the REST port: one readable line naming the scheme to use, not
    the binary frames or the HTTP/2 parser's complaint."""
    server = tiny_ensemble_server
    wrong = {f"http://127.0.0.1:{server.grpc_port}": "it answers in HTTP/2 frames, as a gRPC port does: give "
                                                     "grpc://host:port for it",
             f"grpc://127.0.0.1:{server.rest_port}": f"127.0.0.1:{server.rest_port} answers HTTP/1.x, as a REST "
                                                     "port does: give http://host:port for it"}
    for url, words in wrong.items():
        with connect(url, timeout=10) as client, pytest.raises(Unavailable) as caught:
            client.status("tiny_a")
        assert words in caught.value.message and "\\x00" not in caught.value.message, caught.value.message


def test_client_side_argument_errors(clients):
    for client in clients:
        with pytest.raises(InvalidInput, match="either inputs or images"):
            client.predict("tiny_a")
        with pytest.raises(InvalidInput, match="not both"):
            client.predict("tiny_a", images=[b"x"], version=1, version_label="stable")
        with pytest.raises(InvalidInput, match="bytes"):
            client.predict("tiny_a", images=["a path, not bytes"])


def test_binary_inputs_reach_the_wire_byte_for_byte():
    """numpy's bytes dtype would drop trailing NUL bytes; both clients send what they were given."""
    values = [[b"\xff\xd8 photo \x00\x00", b"x"], [b"\x00", b"end\x00"]]
    array = as_input_array(values)
    assert array.shape == (2, 2) and array.tolist() == values
    for given in (array, values):  # predict_request also takes plain nested lists
        request = GrpcClient("127.0.0.1:1").predict_request("m", {"data_bytes": given}, signature_name="s")
        assert to_ndarray(request.inputs["data_bytes"]).tolist() == values
    sent = encode_value(array, "data_bytes")
    assert [[base64.b64decode(v["b64"]) for v in row] for row in sent] == values
