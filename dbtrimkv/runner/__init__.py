"""The model runner: the one engine under every path (pipeline, video QA, watch, evaluation, server).

It alone owns how the model is run: input defaults and positions (`positions.py`: M-RoPE, rope
deltas, decode positions), vision encoding and its merge per chunk (`vision.py`), the one forward
over a ragged batch of rows (`forward.py`), chunked prefill with eviction (`prefill.py`), decode
steps with per-row stopping (`decode.py`), sampling with validated settings (`sampling.py`), a row's
text and its stop strings (`text.py`) and the pending token of a reply (`pending.py`).
`dbtrimkv.generate` / `prefill` are its one-call API; the server's engine (`serving/stepper.py`)
schedules rows and calls the same pieces step by step.
"""
