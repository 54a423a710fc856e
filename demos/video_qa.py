"""Long-video QA from a checkout: `python demos/video_qa.py --video clip.mp4 "What happens?"`.

Why: a runnable script beside the Gradio demo for people who browse `demos/`. It is the
`dbtrimkv video-qa` command (same options, see `--help`); the logic lives in `dbtrimkv.video_qa`.
"""

from __future__ import annotations

import sys

from dbtrimkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["video-qa", *sys.argv[1:]]))
