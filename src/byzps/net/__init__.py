"""The network driver, I/O only: the wire codec (:mod:`byzps.net.wire`), framed asyncio
transport with TLS (:mod:`byzps.net.transport`), worker keys and message authentication
(:mod:`byzps.net.auth`), the TCP parameter server (:mod:`byzps.net.server`) and the TCP worker
(:mod:`byzps.net.worker`). The round logic they drive is :mod:`byzps.core`'s.
"""
