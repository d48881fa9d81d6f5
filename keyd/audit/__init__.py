"""keyd's audit trail: one structured journald record per decision, and reading it back.

:mod:`~keyd.audit.ids` fixes each event type's MESSAGE_ID, :mod:`~keyd.audit.record`
builds records (refusing anything that looks like key bytes),
:mod:`~keyd.audit.sink` writes them, :mod:`~keyd.audit.reader` reads and renders them.
"""
