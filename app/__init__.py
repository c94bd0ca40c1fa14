"""The Gradio studio (``compose studio``), installed as ``compose.app``.

It is a client of the engine's Python API (:class:`compose.Composer`) and nothing else.
"""
