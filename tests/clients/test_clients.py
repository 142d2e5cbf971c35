"""GrpcClient and RestClient: one interface, the same answers and the same errors for the same requests."""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import time

import numpy as np
import pytest

from carclf.clients import GrpcClient, ModelClient, RestClient, connect, parse_server_url
from carclf.clients.base import as_input_array
from carclf.clients.rest_client import encode_value
from carclf.errors import (
    CarClfError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RequestTooLarge,
    ResourceExhausted,
    Unavailable,
)
from carclf.tensors import to_ndarray
from tests.ensemble.servers import grpc_url, rest_url
from tests.grpc_stubs import serving_prediction_service


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


def test_an_empty_list_of_images_is_refused_before_anything_is_sent():
    """images=[] is a caller's mistake: both clients say so themselves (InvalidInput), without sending a
    request (here nothing listens, so a request sent would be Unavailable instead)."""
    for client in (GrpcClient("127.0.0.1:1", timeout=5), RestClient("http://127.0.0.1:1", timeout=5)):
        with client, pytest.raises(InvalidInput) as caught:
            client.predict("tiny_a", images=[])
        assert caught.value.message == "images is empty: send at least one photo"


def test_top_k_with_one_class_name_too_few_is_invalid_input(clients, photos, labels):
    """Class names for every rank but one short of the model's classes: refused as InvalidInput naming both
    counts, on either client's answer (not an IndexError from the rank the names do not reach)."""
    for client in clients:
        result = client.predict("tiny_a", images=[photos[0].read_bytes()], output_filter=("probabilities",))
        classes = result.probabilities.shape[-1]
        assert result.named_ranks == 0 and classes == len(labels)
        with pytest.raises(InvalidInput, match=f"{classes - 1} class names given, the model answers {classes} "
                                               "classes"):
            result.top_k(classes, labels[:-1])
        assert [name for name, _ in result.top_k(classes, labels)[0]] == [
            labels[int(i)] for i in np.argsort(-result.probabilities[0], kind="stable")]


@pytest.mark.parametrize("url", [grpc_url, rest_url], ids=["grpc", "rest"])
def test_a_closed_client_makes_no_more_calls_on_either_transport(tiny_ensemble_server, url):
    """close() releases the channel or session: any call afterwards is a FailedPrecondition naming the server
    (not grpc's own ValueError, and not a REST session that quietly reconnects); closing twice is harmless."""
    client = connect(url(tiny_ensemble_server), timeout=10)
    assert [s.state for s in client.status("tiny_a")] == ["AVAILABLE", "AVAILABLE"]
    client.close()
    for call in (lambda: client.status("tiny_a"), lambda: client.metadata("tiny_a"),
                 lambda: client.predict("tiny_a", images=[b"not sent"])):
        with pytest.raises(FailedPrecondition, match=re.escape(f"{client.transport} client of {client.target} is closed")):
            call()
    client.close()


@contextlib.contextmanager
def json_http_server(status: int, body: bytes, received: list | None = None):
    """A loopback HTTP server answering every GET and POST with ``status`` and the JSON ``body`` (keeping each
    POSTed JSON document in ``received``); yields its base URL."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answering(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 - http.server's name
            document = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if received is not None:
                received.append(document)
            self.do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def recording_servers():
    """A stub PredictionService (gRPC) and a stub REST :predict, each answering the same fixed outputs (a
    ``*_bytes`` output of bytes that are not UTF-8 among them) and keeping the requests they received."""
    import json

    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from carclf.tensors import make_proto

    crop = b"\xff\xd8\x00\x80 not text \xfe"
    answer = {"probabilities": np.array([[0.25, 0.75]], dtype=np.float32),
              "label": np.array([b"BMW X5"], dtype=object), "crop_bytes": np.array([crop], dtype=object)}
    received: dict[str, list] = {"grpc": [], "rest": []}

    class Predictions(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the service's name
            received["grpc"].append(request)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            for name, value in answer.items():
                response.outputs[name].CopyFrom(make_proto(value))
            return response

    body = json.dumps({"outputs": {"probabilities": [[0.25, 0.75]], "label": ["BMW X5"],
                                   "crop_bytes": [{"b64": base64.b64encode(crop).decode()}]}}).encode()

    with serving_prediction_service(Predictions()) as grpc_port, json_http_server(200, body, received["rest"]) as rest:
        yield {"grpc": f"grpc://127.0.0.1:{grpc_port}", "rest": rest, "crop": crop, "received": received}


def test_bytes_outputs_stay_bytes_and_text_outputs_are_str_on_both(recording_servers):
    """Outputs named ``*_bytes`` are binary (TF Serving sends them as b64 over REST): both clients return their
    exact bytes, while other string outputs (a label) come back as ``str``."""
    crop = recording_servers["crop"]
    for transport in ("grpc", "rest"):
        with connect(recording_servers[transport], timeout=10) as client:
            outputs = client.predict("m", images=[b"a photo"]).outputs
        assert outputs["crop_bytes"].tolist() == [crop] and type(outputs["crop_bytes"][0]) is bytes, transport
        assert outputs["label"].tolist() == ["BMW X5"] and type(outputs["label"][0]) is str, transport


def test_text_inputs_travel_utf8_encoded_on_both(recording_servers):
    """A ``str`` input element reaches the server as its UTF-8 bytes: "é" arrives as b"\\xc3\\xa9" over gRPC,
    as it does in REST's JSON."""
    received = recording_servers["received"]
    text = ["Citroën C4 é", "Škoda"]
    for given in (np.array(text, dtype=object), text):
        for transport in ("grpc", "rest"):
            with connect(recording_servers[transport], timeout=10) as client:
                client.predict("m", inputs={"note": given}, signature_name="notes")
        request, body = received["grpc"][-1], received["rest"][-1]
        assert list(request.inputs["note"].string_val) == [t.encode("utf-8") for t in text]
        assert body["inputs"]["note"] == text  # JSON strings: UTF-8 on the wire
        assert request.model_spec.signature_name == body["signature_name"] == "notes"


@pytest.mark.parametrize("status,error", [(503, Unavailable), (429, ResourceExhausted), (504, DeadlineExceeded),
                                          (404, NotFound)])
def test_rest_errors_without_a_code_field_take_the_type_of_their_http_status(status, error):
    """TF Serving's REST errors are ``{"error": message}`` alone: the HTTP status says what kind (its table:
    unavailable 503, resource exhausted 429, deadline exceeded 504, ...), so RestClient raises the same type
    gRPC would, with the server's message."""
    import json

    body = json.dumps({"error": f"the server's own words for {status}"}).encode()
    with json_http_server(status, body) as url, connect(url, timeout=10) as client, \
            pytest.raises(CarClfError) as caught:
        client.status("tiny_a")
    assert type(caught.value) is error and caught.value.code == error.code
    assert caught.value.message == f"the server's own words for {status}"


@contextlib.contextmanager
def raw_http_peer(answer):
    """A loopback TCP server that reads each HTTP request's head and body, then calls ``answer(connection)``
    (one thread per connection); yields its base URL. For peers that misbehave below HTTP's level."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def read_request(conn) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)

    def one(conn) -> None:
        with conn:
            try:
                read_request(conn)
                answer(conn, stop)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def test_a_rest_server_that_dribbles_its_answer_is_cut_off_at_the_timeout():
    """timeout is the time a call may take (`carclf predict --timeout`: "seconds per request"), as gRPC's
    deadline is: a peer that sends its answer one byte at a time, each byte well within the timeout, must not
    hold the call past it. requests' timeout bounds each socket read only, so such a peer held it as long as
    it kept sending."""
    import time

    def dribble(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        ends = time.monotonic() + 8  # the peer gives up after 8 s, so that the test ends either way
        while time.monotonic() < ends and not stop.is_set():
            conn.sendall(b" ")
            time.sleep(0.2)

    with raw_http_peer(dribble) as url, connect(url, timeout=1) as client:
        started = time.monotonic()
        with pytest.raises(CarClfError) as caught:
            client.status("tiny_a")
        waited = time.monotonic() - started
    assert type(caught.value) is DeadlineExceeded, caught.value
    assert caught.value.message == f"no answer from {client.target} within 1 s"
    assert waited < 3, f"the call took {waited:.1f} s for a timeout of 1 s"


def test_a_rest_answer_that_stops_half_way_is_deadline_exceeded_like_grpc():
    """Headers, then part of the body, then silence: the client's own timeout ends the call. That is
    DEADLINE_EXCEEDED naming the server and the time waited, as for a peer that says nothing at all (and as
    gRPC reports a stalled answer), not UNAVAILABLE "cannot reach" a server that did answer."""
    def stall(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        stop.wait(5)

    with raw_http_peer(stall) as url, connect(url, timeout=0.5) as client, \
            pytest.raises(CarClfError) as caught:
        client.status("tiny_a")
    assert type(caught.value) is DeadlineExceeded, caught.value
    assert caught.value.message == f"no answer from {client.target} within 0.5 s"


@pytest.mark.parametrize("call,body", [
    ("status", b"[]"), ("metadata", b"[]"), ("status", b"null"), ("metadata", b"null"), ("predict", b"null"),
    ("status", b'"ok"'), ("metadata", b'"ok"'), ("status", b"5"), ("metadata", b"5"), ("predict", b"5"),
    ("status", b'{"model_version_status": 5}'), ("status", b'{"model_version_status": [{"state": "AVAILABLE"}]}'),
    ("metadata", b'{"metadata": []}'), ("metadata", b'{"model_spec": {"version": "one"}}'),
    ("predict", b'{"outputs": "x"}'), ("predict", b'{"outputs": {"label": [{"b64": "a"}]}}'),
], ids=["status-list", "metadata-list", "status-null", "metadata-null", "predict-null", "status-string",
        "metadata-string", "status-number", "metadata-number", "predict-number", "status-versions_a_number",
        "status-version_missing", "metadata-metadata_a_list", "metadata-version_not_a_number",
        "predict-outputs_a_string", "predict-b64_not_base64"])
def test_a_rest_answer_of_the_wrong_shape_is_an_error_of_the_product(call, body):
    """A 200 whose JSON is not what TF Serving answers (another service on the port) is the product's Internal
    error, as a body that is not JSON is, never an AttributeError / KeyError / TypeError / ValueError from
    inside the client (which `carclf predict` shows as a traceback, exit 1, not one line and exit 2)."""
    from carclf.errors import Internal

    calls = {"status": lambda c: c.status("tiny_a"), "metadata": lambda c: c.metadata("tiny_a"),
             "predict": lambda c: c.predict("tiny_a", images=[b"a photo"])}
    with json_http_server(200, body) as url, connect(url, timeout=10) as client, pytest.raises(Internal):
        calls[call](client)


@pytest.mark.parametrize("status,body", [
    (502, b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
          b"</center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"),
    (500, b"x" * 2_000_000),
], ids=["proxy_html_page", "two_megabytes"])
def test_an_error_body_that_is_not_json_makes_a_short_one_line_message(status, body):
    """A proxy in front of the server answers errors with its own HTML page; a broken server may answer
    megabytes. The error's message is one line of bounded length (as for a 200 that is not JSON, cut at 200
    characters), not the page's seven lines or the 2 MB that `carclf predict` printed to stderr."""
    with json_http_server(status, body) as url, connect(url, timeout=10) as client, \
            pytest.raises(CarClfError) as caught:
        client.status("tiny_a")
    message = caught.value.message
    assert "\n" not in message and "\r" not in message, message
    assert len(message) <= 500, f"{len(message)} characters"


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:0", "http://127.0.0.1:0", "https://host:0"])
def test_port_zero_is_refused_not_read_as_the_default_port(url):
    """Port 0 is no server's port; it was read as no port at all, so the client talked to the default port
    (8500, 8501 or 443) without a word."""
    with pytest.raises(InvalidInput, match="server address has an invalid port"):
        parse_server_url(url)


def test_a_request_over_the_servers_byte_limit_is_resource_exhausted_on_both(tiny_repository_template, tmp_path,
                                                                             photos):
    """The same too-large request (four photos over --max_request_bytes) raises the same type on both
    transports, as the clients promise: gRPC's RESOURCE_EXHAUSTED. Over REST the server's 413 became Internal,
    so a caller could not tell "send less at once" from a server fault."""
    from tests.ensemble.servers import embedded_server

    photo = photos[0].read_bytes()
    with embedded_server(tiny_repository_template, tmp_path / "server", models=["tiny_a"],
                         max_request_bytes=len(photo) * 2) as server:
        for url in (grpc_url(server), rest_url(server)):
            with connect(url, timeout=10) as client, pytest.raises(CarClfError) as caught:
                client.predict("tiny_a", images=[photo] * 4)
            assert type(caught.value) is RequestTooLarge, (url, caught.value)  # a ResourceExhausted: send less


def test_a_grpc_error_without_details_is_named_by_its_code():
    """A server that fails a call with a status code and no message: the error still says something (the
    code's name), not an empty line."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Silent(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the service's name
            context.abort(grpc.StatusCode.NOT_FOUND, "")

    with serving_prediction_service(Silent(), workers=1) as port, \
            connect(f"grpc://127.0.0.1:{port}", timeout=10) as client, pytest.raises(NotFound) as caught:
        client.predict("tiny_a", images=[b"a photo"])
    assert caught.value.message == "NOT_FOUND"


@contextlib.contextmanager
def holding_prediction_service():
    """A real gRPC PredictionService whose Predict holds each call until the call ends (its client cancels or
    closes it; 30 s at most), except for model "ending", which it ends CANCELLED at once as a server whose
    shutdown has begun does. Yields (port, started, ended): events set when a held call starts and ends."""
    import threading

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    started, ended = threading.Event(), threading.Event()

    class Holding(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the service's name
            if request.model_spec.name == "ending":
                context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
            context.add_callback(ended.set)
            started.set()
            ended.wait(30)
            context.abort(grpc.StatusCode.INTERNAL, "the call was still running")

    with serving_prediction_service(Holding()) as port:
        yield port, started, ended


def test_a_grpc_call_whose_cancel_token_is_cancelled_ends_here_and_on_the_server():
    """``GrpcClient.predict(..., cancel=token)`` (the ensemble gateway's member calls): cancelling the token from
    another thread ends the call at once with CANCELLED, and the server sees its call end."""
    import threading

    from carclf.cancel import CancelToken
    from carclf.errors import Cancelled

    cancel = CancelToken()
    with holding_prediction_service() as (port, started, ended), GrpcClient(f"127.0.0.1:{port}", timeout=30) as client:
        threading.Thread(target=lambda: started.wait(30) and cancel.cancel(), daemon=True).start()
        start = time.monotonic()
        with pytest.raises(Cancelled, match=f"call to 127.0.0.1:{port} was cancelled"):
            client.predict("tiny_a", images=[b"a photo"], cancel=cancel)
        assert time.monotonic() - start < 20  # at the cancel, not the server's 30 s
        assert ended.wait(10), "the server never saw its call end"


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:8500/v1/models/car_ensemble", "grpcs://host:443/x",
                                 "grpc://host:8500?model=a"])
def test_a_grpc_address_with_a_path_is_refused(url):
    """A path (or query) in a gRPC address says something gRPC cannot carry (the model is named by --model);
    it was dropped without a word."""
    with pytest.raises(InvalidInput, match="a gRPC address is host:port only"):
        parse_server_url(url)
    assert parse_server_url("grpc://127.0.0.1:8500/") == ("grpc", "127.0.0.1:8500", False)


@pytest.mark.slow
def test_a_long_lived_grpc_client_is_served_again_soon_after_its_server_comes_back():
    """A server away for 20 s (a TF Serving pod restarting and loading its models): calls fail UNAVAILABLE
    meanwhile, and the first call after it is back succeeds within 4.5 s (the 2 s cap, its 20 % jitter and
    slack for a busy machine). With gRPC's default reconnect
    backoff (growing to 120 s) the client kept failing for seconds to minutes after the server was back
    (6.7 s in the same run on this machine before the cap); the ensemble gateway's member channels are such
    clients."""
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    class Status(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802 - the service's name
            reply = get_model_status_pb2.GetModelStatusResponse()
            reply.model_version_status.add(version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
            return reply

    def serve(port: int):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(Status(), server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server, bound

    server, port = serve(0)
    with connect(f"grpc://127.0.0.1:{port}", timeout=10) as client:
        assert [s.state for s in client.status("m")] == ["AVAILABLE"]
        server.stop(0)
        away = time.monotonic()
        while time.monotonic() - away < 20:
            # UNAVAILABLE, or no answer in time when the call waits on a reconnect attempt (a busy machine)
            with pytest.raises((Unavailable, DeadlineExceeded)):
                client.status("m", timeout=0.5)
            time.sleep(0.2)
        server, bound = serve(port)
        try:
            assert bound == port
            back = time.monotonic()
            while True:
                try:
                    client.status("m", timeout=0.5)
                    break
                except (Unavailable, DeadlineExceeded):
                    assert time.monotonic() - back < 30, "not served again 30 s after the server came back"
                    time.sleep(0.1)
            waited = time.monotonic() - back
        finally:
            server.stop(0)
    assert waited < 4.5, f"served again {waited:.1f} s after the server came back"


def test_a_grpc_call_the_server_ends_cancelled_is_unavailable_unless_this_client_ended_it():
    """A CANCELLED the client did not ask for is the server ending the call before answering (a server whose
    shutdown began as the call came, before the client read its GOAWAY): ``Unavailable``, which callers retry.
    A call ended by this client's own close (another thread's) stays ``Cancelled``: sending it again cannot help."""
    import threading

    from carclf.errors import Cancelled, Unavailable

    with holding_prediction_service() as (port, started, ended), GrpcClient(f"127.0.0.1:{port}", timeout=30) as client:
        with pytest.raises(Unavailable) as caught:
            client.predict("ending", images=[b"a photo"])
        assert caught.value.message.startswith(f"127.0.0.1:{port} ended the call before answering it ("), \
            caught.value.message
        assert "the server is stopping" in caught.value.message and "send it again" in caught.value.message

        threading.Thread(target=lambda: started.wait(30) and client.close(), daemon=True).start()
        start = time.monotonic()
        with pytest.raises(Cancelled):
            client.predict("slow", images=[b"a photo"])
        assert time.monotonic() - start < 20  # at the close, not the server's 30 s
        assert ended.wait(10), "the server never saw its call end"


CLIENT_PROCESS = r"""
import json, sys
import numpy as np
from carclf.clients import connect
from carclf.errors import CarClfError

url, photo = sys.argv[1], sys.argv[2]
pixels = np.arange(2 * 40 * 48 * 3, dtype=np.uint8).reshape(2, 40, 48, 3)
answers = {}
with connect(url) as client:
    a = client.predict("tiny_a", images=[open(photo, "rb").read()])
    b = client.predict("tiny_b", inputs={"pixels": pixels}, signature_name="serving_pixels")
    answers["tiny_a"] = {k: np.asarray(v).tolist() for k, v in a.outputs.items()}
    answers["tiny_b"] = np.asarray(b.outputs["probabilities"]).tolist()
    answers["signatures"] = sorted(client.metadata("tiny_a").signatures)
    answers["status"] = [(s.version, s.state) for s in client.status("tiny_a")]
    try:
        client.predict("no_such_model", images=[b"x"])
    except CarClfError as error:
        answers["error"] = [type(error).__name__, str(error)]
answers["tensorflow_started"] = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.python"))
print(json.dumps(answers))
"""


def test_a_grpc_client_process_gets_the_same_answers_without_starting_tensorflow(clients, photos):
    """TF Serving's protocol modules come without TensorFlow's runtime (carclf.tfprotos): a client process
    answers as one that runs TensorFlow (this test's process) and never loads TensorFlow itself."""
    import json
    import subprocess
    import sys

    url = f"grpc://{clients[0].target}"
    result = subprocess.run([sys.executable, "-c", CLIENT_PROCESS, url, str(photos[0])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["tensorflow_started"] == []
    here = clients[0]
    a = here.predict("tiny_a", images=[photos[0].read_bytes()])
    pixels = np.arange(2 * 40 * 48 * 3, dtype=np.uint8).reshape(2, 40, 48, 3)
    b = here.predict("tiny_b", inputs={"pixels": pixels}, signature_name="serving_pixels")
    np.testing.assert_allclose(seen["tiny_a"]["probabilities"], a.outputs["probabilities"], rtol=1e-6)
    assert seen["tiny_a"]["label"] == np.asarray(a.outputs["label"]).tolist()
    np.testing.assert_allclose(seen["tiny_b"], b.outputs["probabilities"], rtol=1e-6)
    assert seen["signatures"] == sorted(here.metadata("tiny_a").signatures)
    assert seen["status"] == [[s.version, s.state] for s in here.status("tiny_a")]
    with pytest.raises(NotFound) as error:
        here.predict("no_such_model", images=[b"x"])
    assert seen["error"] == ["NotFound", str(error.value)]
