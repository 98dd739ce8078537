"""`instructlm serve`: a run behind OpenAI's HTTP API, with a page to try it in a browser.

    settings.py    what the server may be asked (the command line reads its defaults)
    schema.py      OpenAI's request and response shapes, and the limits of one request
    body_limit.py  request bodies bounded in size and time, before FastAPI reads them
    planner.py     a checked request turned into rows of a decoding loop, and their
                   answers, whole or streamed
    batcher.py     the decoding loop of a model: rows join and leave between steps
                   (continuous batching), from a bounded queue
    metrics.py     what /metrics tells, in Prometheus' format
    app.py         the routes, the API key, errors in OpenAI's shape, server-sent events,
                   the page (playground.html), and starting the server

Nothing is imported here, so that the command line can read the settings without loading
the web stack.
"""
