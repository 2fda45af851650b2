"""phantom-top: a live terminal monitor of the cluster (``bin/phantom-top``, ``make top``).

``model`` turns status documents and bus events into rows and text (no I/O),
``feed`` polls the status and listens to the bus in background threads, and
``app`` is the Textual application and the command line.
"""
