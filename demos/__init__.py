"""Demos, installed as `dbtrimkv.demos`: the Gradio chat app and the long-video QA script."""
