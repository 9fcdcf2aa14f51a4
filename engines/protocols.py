"""The protocols other clients speak, on top of the served models (serve.py).

OpenAI embeddings (`POST /v1/embeddings`, `GET /v1/models`): what the `openai` client, LangChain and
LlamaIndex call. KServe v2 / Open Inference Protocol (`/v2/...`): what tritonclient and perf_analyzer
call; its tensors are the model's raw inputs and outputs, as Triton serves the same .onnx, in JSON
or in the binary tensor extension.
"""

import base64
import json
from typing import Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from .batching import Refusal
from .dtypes import from_kserve, kserve_type



class EmbeddingsRequest(BaseModel):
    """The OpenAI embeddings request body."""

    input: str | list[str] | list[list[int]] | list[int] = Field(description="a text, texts, or token-id lists")
    model: str = Field(description="a served model's name (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def encode_embedding(vector: np.ndarray, encoding_format: str):
    """A float list, or base64 of little-endian float32 as the OpenAI API sends it."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def add_openai_routes(app, served):
    @app.post("/v1/embeddings", name="openai-embeddings", summary="OpenAI-compatible embeddings")
    async def embeddings(body: EmbeddingsRequest):
        model = served.pick(body.model)
        single = isinstance(body.input, str) or (body.input and isinstance(body.input[0], int))
        inputs = [body.input] if single else body.input
        if not inputs:
            raise Refusal(400, "input is empty; give a text, a list of texts or a list of token-id lists")
        served.check_count(len(inputs))
        width = model.runner.outputs[[o["name"] for o in model.runner.outputs].index(model.embedding)]["shape"][-1]
        if body.dimensions is not None and body.dimensions != width:
            raise Refusal(400, f"model {model.name!r} gives {width} dimensions, not {body.dimensions}")
        if isinstance(inputs[0], str):
            model.require("text")
            tokens = []

            async def counted():  # tokenised once admitted; usage counts the tokens the model saw
                examples = await model.texts(inputs)
                tokens.extend(int(example["attention_mask"].sum()) for example in examples)
                return examples

            results = await model.batcher.submit(len(inputs), counted())
        else:
            examples, tokens = model.token_ids(inputs), [len(ids) for ids in inputs]
            results = await model.batcher.submit(len(inputs), examples)
        tokens = sum(tokens)
        data = [{"object": "embedding", "index": i, "embedding": encode_embedding(result[model.embedding][0], body.encoding_format)}
                for i, result in enumerate(results)]
        return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/models", name="openai-models", summary="the served models (OpenAI list)")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tokenfuse"} for name in served]}


def _tensor_metadata(binding: dict) -> dict:
    return {"name": binding["name"], "datatype": kserve_type(binding["dtype"]), "shape": [-1] + list(binding["shape"][1:])}


def _read_tensor(tensor, spec: dict, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from a KServe request (JSON data or the binary extension); the new offset."""
    name, expected = spec["name"], kserve_type(spec["dtype"])
    if tensor.get("datatype") != expected:
        raise Refusal(400, f"input {name!r} has datatype {tensor.get('datatype')!r}; the model takes {expected}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Refusal(400, f"input {name!r}: shape must be a list of non-negative integers")
    wanted = list(spec["shape"][1:])
    if shape[0] < 1 or len(shape) != len(wanted) + 1 or any(w not in (-1, d) for w, d in zip(wanted, shape[1:])):
        raise Refusal(400, f"input {name!r} has shape {shape}, expected [batch, {', '.join(map(str, wanted))}]")
    dtype, count = from_kserve(expected), int(np.prod(shape))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            if offset + size > len(binary):
                raise Refusal(400, f"input {name!r}: binary_data_size {size} runs past the end of the body")
            array, offset = np.frombuffer(binary[offset : offset + size], dtype=np.dtype(dtype).newbyteorder("<")), offset + size
        else:
            array = np.asarray(tensor.get("data"), dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise Refusal(400, f"input {name!r}: data are not {expected} values")
    if array.size != count:
        raise Refusal(400, f"input {name!r}: {array.size} values for shape {shape} ({count})")
    return array.astype(dtype).reshape(shape), offset


def _output_tensor(name: str, array: np.ndarray, binary: bool, buffers: list[bytes]) -> dict:
    tensor = {"name": name, "datatype": kserve_type(str(array.dtype)), "shape": list(array.shape)}
    if binary:
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        buffers.append(data)
        tensor["parameters"] = {"binary_data_size": len(data)}
    else:
        tensor["data"] = array.reshape(-1).tolist()
    return tensor


def add_kserve_routes(app, served):
    def model_for(name: str, version: str | None):
        model = served.pick(name, missing_status=400)
        if version not in (None, "", "1"):
            raise Refusal(400, f"model {name!r} has only version 1")
        return model

    @app.get("/v2", name="v2-server")
    async def server_metadata():
        from importlib.metadata import PackageNotFoundError, version

        try:
            own = version("tokenfuse")
        except PackageNotFoundError:
            own = "unknown"
        return {"name": "tokenfuse", "version": own, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", name="v2-live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", name="v2-ready")
    async def ready():
        return Response(status_code=503 if served.closing else 200)

    @app.get("/v2/models/{name}", name="v2-model")
    @app.get("/v2/models/{name}/versions/{version}", name="v2-model")
    async def model_metadata(name: str, version: str | None = None):
        model = model_for(name, version)
        return {
            "name": model.name,
            "versions": ["1"],
            "platform": model.runner.triton_platform,
            "inputs": [_tensor_metadata(b) for b in model.runner.inputs],
            "outputs": [_tensor_metadata(b) for b in model.runner.outputs],
        }

    @app.get("/v2/models/{name}/ready", name="v2-model-ready")
    @app.get("/v2/models/{name}/versions/{version}/ready", name="v2-model-ready")
    async def model_ready(name: str, version: str | None = None):
        model = model_for(name, version)
        return Response(status_code=503 if model.batcher.closing else 200)

    @app.post("/v2/models/{name}/infer", name="v2-infer")
    @app.post("/v2/models/{name}/versions/{version}/infer", name="v2-infer")
    async def infer(name: str, request: Request, version: str | None = None):
        model = model_for(name, version)
        raw = await request.body()
        header_length = request.headers.get("inference-header-content-length")
        if header_length is not None and (not header_length.isdigit() or int(header_length) > len(raw)):
            raise Refusal(400, "Inference-Header-Content-Length is not a length within the body")
        split = int(header_length) if header_length is not None else len(raw)
        try:
            body = json.loads(raw[:split])
        except ValueError:
            raise Refusal(400, "the inference request is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not all(isinstance(t, dict) for t in body["inputs"]):
            raise Refusal(400, 'the inference request needs "inputs": [{"name", "shape", "datatype", "data"}, ...]')
        specs = {b["name"]: b for b in model.runner.inputs}
        given = {t.get("name"): t for t in body["inputs"]}
        if set(given) != set(specs):
            raise Refusal(400, f"the model takes inputs {sorted(specs)}; the request gives {sorted(map(str, given))}")
        binary, offset, feeds = memoryview(raw)[split:], 0, {}
        for tensor in body["inputs"]:
            feeds[tensor["name"]], offset = _read_tensor(tensor, specs[tensor["name"]], binary, offset)
        batch = {len(array) for array in feeds.values()}
        if len(batch) != 1:
            raise Refusal(400, "the inputs' batch sizes differ")
        batch = batch.pop()
        served.check_count(batch)
        if "input_ids" in feeds and model.preprocess.tokenizer is not None:
            vocabulary = len(model.preprocess.tokenizer)
            if feeds["input_ids"].min() < 0 or feeds["input_ids"].max() >= vocabulary:
                raise Refusal(400, f"input_ids outside 0..{vocabulary - 1}")

        outputs = {o["name"] for o in model.runner.outputs}
        binary_default = bool((body.get("parameters") or {}).get("binary_data_output", False))
        requested = body.get("outputs")
        if requested is None:
            requested = [{"name": o["name"]} for o in model.runner.outputs]
        if not isinstance(requested, list) or not all(isinstance(r, dict) and r.get("name") in outputs for r in requested):
            raise Refusal(400, f"outputs must name some of {sorted(outputs)}")

        results = await model.batcher.submit(batch, [{n: array[i : i + 1] for n, array in feeds.items()} for i in range(batch)])
        buffers: list[bytes] = []
        tensors = [
            _output_tensor(r["name"], np.concatenate([result[r["name"]] for result in results]),
                           bool((r.get("parameters") or {}).get("binary_data", binary_default)), buffers)
            for r in requested
        ]
        answer = {"model_name": model.name, "model_version": "1", "outputs": tensors}
        if "id" in body:
            answer["id"] = body["id"]
        header = json.dumps(answer).encode()
        if not buffers:
            return Response(header, media_type="application/json")
        return Response(header + b"".join(buffers), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})
