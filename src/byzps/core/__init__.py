"""The I/O-free heart of a run: the messages (:mod:`byzps.core.messages`), the round state
machines (:mod:`byzps.core.rounds`), the PS core with its after-close step
(:mod:`byzps.core.ps`) and the worker core (:mod:`byzps.core.worker`).

Every driver (the TCP server and worker in :mod:`byzps.net`, the in-process simulator
:mod:`byzps.simulate`) runs this code unchanged; nothing here imports asyncio, socket, ssl or
:mod:`byzps.net`.
"""
