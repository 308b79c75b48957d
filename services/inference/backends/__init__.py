"""Execution backends behind one interface (`base.DecoderBackend`), and how one is chosen."""
