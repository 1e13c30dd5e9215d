"""Ferry's configuration server: an Azure Functions app (Python v2 model).

``function_app.py`` creates the app and registers one blueprint per area
(``registration``, ``replication``, ``jobs``, ``monitoring``); the decorated
functions only parse the request, call a plain function in ``functions.core``
and answer.  ``python -m functions.local`` serves the same app under an ASGI
server, with its timer running in-process, on the embedded default.
"""
