"""Serving BAGEL over HTTP: an OpenAI-compatible API and a web app on one loaded pipeline.

Layers, each usable without the ones above it:

* :mod:`.requests` — request objects and their validation into library keyword arguments (no HTTP);
* :mod:`.scheduler` — jobs, the bounded queue, batches of compatible requests, deadlines, cancellation;
* :mod:`.runner` — one batch -> one library call;
* :mod:`.engine` — the pipeline and the single GPU worker thread, graceful shutdown;
* :mod:`.metrics` — Prometheus text;
* :mod:`.api` — the FastAPI routes (OpenAI shapes, SSE, error mapping) and :mod:`.server` — uvicorn;
* :mod:`.webapp` — the Gradio app.

``api``, ``server`` and ``webapp`` need the optional extras ``[serve]`` and ``[app]``.
"""
