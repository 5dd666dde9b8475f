"""Loads saved UI workflows into ComfyUI's page in headless Chromium and prints every Mochi node's
widgets after loading and the inputs the frontend would queue, with a screenshot
per workflow: the check that a workflow saved with an earlier widget layout opens with its values
in the same meaning (web/widget_layouts.js), in the real frontend.

    # a ComfyUI with this pack on port 8121 (comfy_harness run_workflow.py --start-only --pack .)
    /tmp/comfy/venv/bin/python tools/browser_widget_check.py OUT_DIR tests/fixtures/*.json

Needs `chromium` (Debian package) and aiohttp (ComfyUI's venv has it); speaks the DevTools protocol.
"""
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

import aiohttp

PORT, CDP = 8121, 9231
OUT = sys.argv[1]
files = sys.argv[2:]

async def main():
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               f"--user-data-dir={OUT}/profile", f"--remote-debugging-port={CDP}",
                               "--window-size=1600,1000", f"http://127.0.0.1:{PORT}/"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{CDP}/json"))
                page = next(p for p in pages if p["type"] == "page")
                break
            except Exception:
                time.sleep(0.5)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = 0
                async def call(method, **params):
                    nonlocal counter
                    counter += 1
                    await ws.send_json({"id": counter, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == counter:
                            if "error" in msg:
                                raise RuntimeError(msg["error"])
                            return msg["result"]
                async def js(expression):
                    result = await call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
                    if "exceptionDetails" in result:
                        raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
                    return result["result"].get("value")
                for _ in range(120):
                    ready = await js("!!(window.app && window.app.graph && window.app.extensionManager !== undefined)")
                    if ready:
                        break
                    await asyncio.sleep(1)
                await asyncio.sleep(3)
                print("extensions:", await js("app.extensions.map(e => e.name).filter(n => n.includes('Mochi'))"))
                for path in files:
                    workflow = json.load(open(path))
                    await js(f"app.loadGraphData({json.dumps(workflow)}, true, true, 'check')")
                    await asyncio.sleep(2)
                    widgets = await js("Object.fromEntries(app.graph._nodes.filter(n => n.type.startsWith('Mochi'))"
                                       ".map(n => [n.type, n.widgets.map(w => [w.name, w.value])]))")
                    prompt = await js("app.graphToPrompt().then(p => p.output)")
                    print("==", path)
                    for node_type, values in widgets.items():
                        queued = next(v for v in prompt.values() if v["class_type"] == node_type)
                        print(f"{node_type} widgets after load:", values)
                        print(f"{node_type} queued inputs:",
                              {k: v for k, v in queued["inputs"].items() if not isinstance(v, list)})
                    await js("document.querySelectorAll('.p-dialog-close-button, button[aria-label=Close]').forEach(b => b.click()); true")
                    await asyncio.sleep(1)
                    await js("app.canvas.ds.offset = [-500, 0]; app.canvas.ds.scale = 0.75; app.canvas.setDirty(true, true); true")
                    await asyncio.sleep(1)
                    shot = await call("Page.captureScreenshot", format="png")
                    out = os.path.join(OUT, os.path.basename(path).replace(".json", ".png"))
                    open(out, "wb").write(base64.b64decode(shot["data"]))
                    print("screenshot:", out)
    finally:
        chrome.terminate()
        chrome.wait(10)

asyncio.run(main())
