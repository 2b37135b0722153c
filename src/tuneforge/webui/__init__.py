"""The web UI (`tuneforge webui`): a bilingual board over the same config, training, chat, eval and export."""
