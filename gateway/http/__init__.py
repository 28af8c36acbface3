"""The data path's own HTTP/1.1: a client-facing server and a keep-alive upstream client on
asyncio Protocols with httptools (llhttp), their shared flow control, and header rewriting."""
