"""Drive headless Chromium over the DevTools protocol: open ComfyUI's page, load a UI-format workflow, queue it, wait
for the Bias Audit node to receive its audit, and screenshot that node.

Runs with the ComfyUI test venv's Python (it uses that venv's aiohttp for the websocket; the project venv has no
websocket client):  ``python browser_driver.py CHROMIUM SERVER_URL WORKFLOW.json OUT.png``.
Prints one JSON line: the node's ``fair_audit`` report as the page received it, the chart canvas as a PNG data
URL, and the screenshot path.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time

import aiohttp

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--window-size=1400,1000",
         "--remote-debugging-port=0"]
FIND_NODE = 'app.graph._nodes.find((n) => n.type === "FairBiasAudit")'


class Session:
    """One page target of the browser, commands sent over the browser websocket with its session id."""

    def __init__(self, socket, session_id: str | None):
        self.socket, self.session_id, self.ids = socket, session_id, itertools.count(1)

    async def send(self, method: str, **params):
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params}
        if self.session_id is not None:
            message["sessionId"] = self.session_id
        await self.socket.send_json(message)
        async for message in self.socket:
            data = json.loads(message.data)
            if data.get("id") == message_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError("the browser closed the connection")

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}")


async def drive(browser_url: str, server: str, workflow: dict, out: str) -> dict:
    async with aiohttp.ClientSession() as http, http.ws_connect(browser_url, max_msg_size=0) as socket:
        browser = Session(socket, None)
        target = await browser.send("Target.createTarget", url="about:blank")
        attached = await browser.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Session(socket, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Page.navigate", url=server)
        await page.wait_for("Boolean(window.app && window.app.graph && window.app.graph._nodes)", 60,
                            "the ComfyUI page")
        await page.evaluate(f"app.loadGraphData({json.dumps(workflow)})"
                            ".then(() => app.queuePrompt(0, 1)).then(() => true)")
        await page.wait_for(f"Boolean({FIND_NODE}?.fairAuditReport)", 300, "the Bias Audit node's execution")
        box = await page.evaluate(f"""(() => {{
            const node = {FIND_NODE};
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [-node.pos[0] + 30, -node.pos[1] + 60];
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            return {{width: node.size[0] + 60, height: node.size[1] + 90}};
        }})()""")
        await asyncio.sleep(1.0)  # the DOM widget follows the canvas on the next animation frames
        shot = await page.send("Page.captureScreenshot", format="png",
                               clip={"x": 0, "y": 0, "width": box["width"], "height": box["height"], "scale": 1})
        with open(out, "wb") as file:
            file.write(base64.b64decode(shot["data"]))
        report = await page.evaluate(f"{FIND_NODE}.fairAuditReport")
        chart = await page.evaluate(f"{FIND_NODE}.fairAuditCanvas.toDataURL('image/png')")
        return {"report": report, "chart": chart, "screenshot": out}


def main(chromium: str, server: str, workflow_path: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            browser_url = None
            for line in process.stderr:
                found = re.search(r"DevTools listening on (ws://\S+)", line)
                if found:
                    browser_url = found.group(1)
                    break
            if browser_url is None:
                raise RuntimeError(f"chromium did not start (exit {process.poll()})")
            with open(workflow_path) as file:
                workflow = json.load(file)
            print(json.dumps(asyncio.run(drive(browser_url, server, workflow, out))))
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:5])
