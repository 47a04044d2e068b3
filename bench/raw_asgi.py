"""The HTTP ceiling for bench/http.py: a bare ASGI app that does the least any verifyKey server
must do (read the whole request body, answer a verify-sized JSON) and nothing else.

    granian --interface asgi --loop uvloop --http auto --no-ws --workers N --log-level warning \
        --working-dir <repo> bench.raw_asgi:app

Every request, whatever its method or path, gets 200 and the same bytes: a real VALID verifyKey
answer for a key with one auto-applied ratelimit and credits (as keysvc sends for the bench key),
with content-type application/json and content-length.
"""

BODY = (
    b'{"meta":{"requestId":"req_3fK9aB2cD"},"data":{"valid":true,"code":"VALID",'
    b'"keyId":"key_2x7Qm9LpR4sT8vWz","keyspaceId":"ks_8hJ3kN5pQ2rS6tUv","name":"bench key",'
    b'"credits":999999999876543,"enabled":true,"ratelimits":[{"exceeded":false,'
    b'"id":"rl_5cD7fG9hJ2kL4mN6","name":"requests","limit":1000000000000,"duration":60000,'
    b'"reset":1764331260000,"remaining":999999876543,"autoApply":true}]}}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}


async def app(scope, receive, send):
    if scope["type"] == "http":
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        await send(START)
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
