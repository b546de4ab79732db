"""An OpenAI-compatible server over the Engine: `python -m infer.serve --model default [--adapter NAME=DIR ...]`.

app.py (routes, errors, auth), loop.py (the one engine thread), protocol.py (OpenAI's wire format),
__main__.py (the command line). Nothing here is imported by `import infer`: fastapi and uvicorn are the
`serve` extra, needed only to serve.
"""
