"""The LoRA Studio web app: four tabs over the library.

    from ui.app import build_app, launch
    launch(build_app(), host="127.0.0.1", port=7860)

`build_app()` only lays out components and wires handlers: it loads no model, starts no job and
touches no file, so tests can build it freely. Training runs in the job service's worker
process; the page watches it through the job store.
"""

from __future__ import annotations

import gradio as gr

from lora_studio.engine_pool import EnginePool
from lora_studio.home import studio_home

from . import adapters_tab, chat_tab, classify_tab, data_tab, train_tab
from .common import is_loopback, shows_errors
from .uploads import DEFAULT_MAX_UPLOAD_MB

CSS = """
.ls-sample pre { white-space: pre-wrap; font-size: 0.85em; margin: 0.2em 0 0.8em; }
.ls-sample-title { font-weight: 600; font-size: 0.85em; opacity: 0.7; }
mark.ls-learn { background: #c8f7c5; color: #111; border-radius: 3px; }
.ls-legend { font-size: 0.85em; opacity: 0.8; }
.ls-bar { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; margin: 4px 0 8px; }
.ls-bar-fill { height: 100%; background: #f97316; transition: width 0.5s; }
.ls-bar-fill.ls-succeeded { background: #16a34a; }
.ls-bar-fill.ls-failed, .ls-bar-fill.ls-interrupted { background: #dc2626; }
.ls-bar-fill.ls-cancelled { background: #9ca3af; }
.ls-error { color: #dc2626; }
"""


def build_app(max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, host: str = "127.0.0.1") -> gr.Blocks:
    """The app; `host` is the address it will be bound to: beyond loopback, typed paths are limited."""
    max_upload_bytes = int(max_upload_mb * 2**20)
    public = not is_loopback(host)
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown(
            "# LoRA Studio\nFine-tune a language model on your own data, watch it train, "
            "chat with the result and export it."
        )
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data = data_tab.build(max_upload_bytes, public)
            with gr.Tab("Train", id="train"):
                train = train_tab.build(public)
            with gr.Tab("Chat", id="chat") as chat_page:
                chat = chat_tab.build(EnginePool(max_bases=2))
            with gr.Tab("Adapters", id="adapters") as adapters_page:
                adapters = adapters_tab.build(public)
            with gr.Tab("Classify", id="classify") as classify_page:
                classify = classify_tab.build()
        # The Train tab follows the dataset chosen on the Data tab.
        data.dataset.change(
            data_tab.refresh_datasets, inputs=data.dataset, outputs=train.dataset, api_visibility="private"
        )
        train.dataset.focus(
            data_tab.refresh_datasets, inputs=train.dataset, outputs=train.dataset, api_visibility="private"
        )
        app.load(shows_errors(train_tab.on_page_load), outputs=train.job, api_visibility="private")
        app.load(
            shows_errors(train_tab.restore_where),
            outputs=[train.where, train.ray_address],
            api_visibility="private",
        )
        # Lists come from the job store and the run folders, so a reload or restart shows them all.
        for trigger in (app.load, chat_page.select):
            trigger(
                shows_errors(chat_tab.refresh_models),
                inputs=chat.model,
                outputs=chat.model,
                api_visibility="private",
            )
        for trigger in (app.load, adapters_page.select):
            trigger(
                shows_errors(adapters_tab.refresh),
                inputs=adapters.adapter,
                outputs=[adapters.adapter, adapters.table],
                api_visibility="private",
            )
        for trigger in (app.load, classify_page.select):
            trigger(
                shows_errors(classify_tab.refresh),
                inputs=classify.adapter,
                outputs=classify.adapter,
                api_visibility="private",
            )
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    block: bool = True,
) -> None:
    """Serve the app: loopback by default, never a public share link, only the studio's exports served."""
    exports = studio_home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        max_file_size=int(max_upload_mb * 2**20),
        allowed_paths=[str(exports)],
        css=CSS,
        footer_links=["api"],
        prevent_thread_lock=not block,
        quiet=False,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
    )
