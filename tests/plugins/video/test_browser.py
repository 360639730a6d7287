"""A run-like ``samples.html`` with the video writer's files opened in a real headless browser
(Debian ``chromium-headless-shell``): every ``<video>`` and ``<img>`` must load and decode.

The check works on a copy of the page with one script added (the page itself has none): it
waits for each video's ``loadeddata`` (its first frame decoded), then seeks to its last frame
and waits for ``seeked`` (the whole stream decodes), and for each image's ``load`` with a
non-zero ``naturalWidth``; errors are recorded with the media error's message. The result is
written into the DOM, which ``--dump-dom`` prints. Images are switched to eager loading
(the page lazy-loads them, and an off-screen lazy image would never be fetched).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("av", reason="writing videos needs PyAV: pip install 'selfflow[video]'")

from selfflow.plugins.gallery import Gallery, GalleryEntry
from selfflow.plugins.protocols import MediaFile
from selfflow.plugins.video.writer import VideoWriter

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no headless Chromium found (looked for " + ", ".join(BROWSERS) + "); "
    "install Debian's chromium-headless-shell (apt-get install chromium-headless-shell) for the real-browser check",
)

CHECK = """
<script>
(() => {
  const out = {};
  const media = [...document.querySelectorAll('video, img')];
  let left = media.length;
  const done = (el, ok, why) => {
    const key = el.tagName.toLowerCase() + ' ' + el.getAttribute('src');
    if (key in out) return;
    out[key] = {ok: ok, why: why || '', width: el.videoWidth || el.naturalWidth || 0};
    if (--left === 0) document.getElementById('media-check').textContent = JSON.stringify(out);
  };
  const failed = (el) => () => done(el, false, el.error ? el.error.code + ': ' + el.error.message : 'error event');
  for (const el of media) {
    if (el.tagName === 'IMG') {
      el.loading = 'eager';
      if (el.complete) { el.naturalWidth > 0 ? done(el, true) : done(el, false, 'not decodable'); continue; }
      el.addEventListener('load', () => el.naturalWidth > 0 ? done(el, true) : done(el, false, 'not decodable'));
      el.addEventListener('error', () => done(el, false, 'error event'));
    } else {
      el.preload = 'auto';
      el.addEventListener('error', failed(el));
      el.addEventListener('loadeddata', () => {
        el.addEventListener('seeked', () => done(el, el.videoWidth > 0 && !el.error, 'after seeking to the end'));
        el.currentTime = Math.max(0, el.duration - 0.01);
      });
      el.load();
    }
  }
  if (!media.length) document.getElementById('media-check').textContent = '{}';
})();
</script>
"""


def check_page(page, tmp_path) -> dict[str, dict]:
    """Open a copy of ``page`` (beside it, so relative links hold) and return what each
    ``<video>``/``<img>`` did: ``{"video src": {"ok": bool, "why": str, "width": int}}``."""
    html = page.read_text(encoding="utf-8")
    probe = page.with_name(".media-check.html")
    probe.write_text(html.replace("</body>", '<pre id="media-check">pending</pre>' + CHECK + "</body>"), "utf-8")
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files", "--autoplay-policy=no-user-gesture-required",
    ]  # fmt: skip
    try:
        # on loaded machines (the suite's other workers) the decoders may not finish inside the
        # virtual-time budget: the page is then still "pending"; try once more with 3x the budget
        for budget in (10000, 30000):
            argv = [*cmd, f"--virtual-time-budget={budget}", "--dump-dom", probe.resolve().as_uri()]
            dom = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
            found = re.search(r'<pre id="media-check">(.*?)</pre>', dom, re.S)
            if not found or found.group(1) != "pending":
                break
    finally:
        probe.unlink()
    assert found, f"the browser printed no page:\n{dom[:500]}"
    assert found.group(1) != "pending", "some media never reported load or error"
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def run_like_page(directory):
    """samples.html of a run: a video entry (the writer's strip and MP4s) and an image grid."""
    x = torch.zeros(3, 1, 9, 32, 32) - 1
    for i in range(3):
        for k in range(9):
            x[i, :, k, 4 + 2 * k : 12 + 2 * k, 4 + i * 8 : 12 + i * 8] = 1.0  # a moving bar
    samples = directory / "samples"
    files = VideoWriter.from_config().write(x, samples, stem="step_0000010", labels=["a", "a", "b"], title="video")
    png = samples / "image_grid.png"
    shutil.copy(files[0].path, png)
    gallery = Gallery(directory, title="run")
    gallery.add(GalleryEntry(step=10, stream="main", modality="video", files=files, labels=["a", "a", "b"]))
    gallery.add(
        GalleryEntry(step=10, stream="main", modality="image", files=[MediaFile(path=png, element="img")], labels=[])
    )
    return gallery.page, files


def test_every_video_and_image_of_samples_html_plays(tmp_path):
    page, _ = run_like_page(tmp_path / "run")
    result = check_page(page, tmp_path)
    videos = {k: v for k, v in result.items() if k.startswith("video ")}
    images = {k: v for k, v in result.items() if k.startswith("img ")}
    assert len(videos) == 3 and len(images) == 2, result
    bad = {k: v for k, v in result.items() if not v["ok"]}
    assert not bad, f"broken media in samples.html (is H.264 playable in this browser?): {bad}"
    assert all(v["width"] == 128 for v in videos.values())  # 32 px enlarged 4x


def test_the_check_catches_a_broken_video_and_image(tmp_path):
    page, files = run_like_page(tmp_path / "run")
    mp4 = files[2].path
    mp4.write_bytes(mp4.read_bytes()[:300])  # truncated
    files[0].path.write_bytes(b"not a png")
    result = check_page(page, tmp_path)
    bad = {k for k, v in result.items() if not v["ok"]}
    assert bad == {f"video samples/{mp4.name}", f"img samples/{files[0].path.name}"}, result
