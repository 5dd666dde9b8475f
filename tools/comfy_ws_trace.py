"""Queue an API-format workflow on a running ComfyUI and count what its websocket sends:
`progress` messages per node and binary preview images (the latent previews the sampler makes
when the server runs with --preview-method latent2rgb or auto).

    python tools/comfy_ws_trace.py workflow_api.json [--port 8188] [--set 6.seed=3 ...]

Prints one JSON line: {"status", "progress": {node: [values]}, "previews": n, "preview_sizes": [...]}.
Exits 0 when the prompt succeeded. Needs aiohttp (ComfyUI's own dependency).
"""

import argparse
import asyncio
import io
import json
import uuid

import aiohttp


async def trace(args) -> dict:
    with open(args.workflow) as f:
        prompt = json.load(f)
    for item in args.set:
        target, value = item.split("=", 1)
        node, name = target.split(".", 1)
        prompt[node]["inputs"][name] = json.loads(value)
    client_id = uuid.uuid4().hex
    base = f"http://{args.host}:{args.port}"
    progress, previews, sizes, status = {}, 0, [], None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base}/ws?clientId={client_id}") as ws:
            async with session.post(f"{base}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                queued = await response.json()
                if response.status != 200:
                    return {"status": f"rejected ({response.status})", "response": queued}
            prompt_id = queued["prompt_id"]
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    from PIL import Image

                    previews += 1  # 4-byte event type, 4-byte format, then the image bytes
                    sizes.append(list(Image.open(io.BytesIO(message.data[8:])).size))
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] == "progress":
                    progress.setdefault(data["node"], []).append(data["value"])
                elif event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    status = event["type"]
                    break
    return {"status": status, "progress": progress, "previews": previews, "preview_sizes": sizes[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON")
    result = asyncio.run(trace(parser.parse_args()))
    print(json.dumps(result))
    return 0 if result["status"] == "execution_success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
