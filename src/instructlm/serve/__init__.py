"""`instructlm serve`: a run behind OpenAI's HTTP API, with a page to try it in a browser.

    settings.py    what the server may be asked (the command line reads its defaults)
    schema.py      OpenAI's request and response shapes, and the limits of one request
    body_limit.py  request bodies bounded in size and time, before FastAPI reads them
    planner.py     a checked request turned into answers, whole or streamed, one model call
                   at a time
    app.py         the routes, the API key, errors in OpenAI's shape, server-sent events,
                   the page (playground.html), and starting the server

Nothing is imported here, so that the command line can read the settings without loading
the web stack.
"""
