"""Ferry's configuration server: the Functions app and its blueprints, nothing else.

Authentication is Ferry's own bearer tokens (docs/api.md), so the HTTP
functions are anonymous to the Functions host.  ``python -m functions.local``
serves this same app under an ASGI server on the embedded default.
"""

import azure.functions as func

from functions import jobs, monitoring, registration, replication

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(registration.bp)
app.register_functions(replication.bp)
app.register_functions(jobs.bp)
app.register_functions(monitoring.bp)
