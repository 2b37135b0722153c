"""Every visible string of the web UI in English and Chinese; the language switch re-labels the page live."""

from __future__ import annotations

LANGUAGES = ("en", "zh")

# key -> (English, Chinese)
STRINGS: dict[str, tuple[str, str]] = {
    "title": ("## tuneforge board: fine-tune language models", "## tuneforge 看板：微调大语言模型"),
    "lang": ("Language", "语言"),
    "model": ("Model (alias, local folder or hub id)", "模型（别名、本地文件夹或 Hub ID）"),
    "hub": ("Hub", "模型来源"),
    "method": ("Method", "微调方法"),
    "adapters": ("Adapters of earlier runs", "已训练的适配器"),
    "refresh_adapters": ("Refresh adapters", "刷新适配器"),
    "template": ("Chat template", "对话模板"),
    # tabs
    "tab_train": ("Train", "训练"),
    "tab_eval": ("Evaluate & Predict", "评估与预测"),
    "tab_chat": ("Chat", "对话"),
    "tab_export": ("Export", "导出"),
    # train: data
    "stage": ("Stage", "训练阶段"),
    "dataset_dir": ("Dataset folder", "数据集目录"),
    "dataset": ("Datasets", "数据集"),
    "refresh_datasets": ("Refresh datasets", "刷新数据集"),
    "preview_data": ("Preview data", "预览数据"),
    "page": ("Page", "页码"),
    "raw_rows": ("Raw rows", "原始数据"),
    "encoded_rows": ("Encoded rows (trained tokens in green)", "编码结果（绿色为参与训练的 token）"),
    "identity_name": ("Identity: model name", "身份数据：模型名称"),
    "identity_author": ("Identity: author", "身份数据：作者"),
    # train: hyperparameters
    "hyperparams": ("Hyperparameters", "训练参数"),
    "learning_rate": ("Learning rate", "学习率"),
    "epochs": ("Epochs", "训练轮数"),
    "max_steps": ("Max steps (-1: from epochs)", "最大步数（-1 表示按轮数）"),
    "cutoff_len": ("Cutoff length", "截断长度"),
    "max_samples": ("Max samples per dataset", "每个数据集的最大样本数"),
    "batch_size": ("Batch size", "批处理大小"),
    "grad_accum": ("Gradient accumulation", "梯度累积"),
    "scheduler": ("LR scheduler", "学习率调度器"),
    "warmup_ratio": ("Warmup ratio", "预热比例"),
    "precision": ("Compute precision", "计算精度"),
    "max_grad_norm": ("Max gradient norm", "最大梯度范数"),
    "val_size": ("Validation size", "验证集比例"),
    "packing": ("Pack sequences", "序列打包"),
    "logging_steps": ("Logging steps", "日志间隔"),
    "save_steps": ("Save steps", "保存间隔"),
    "seed": ("Seed", "随机种子"),
    "report_to": ("Report to", "日志上报"),
    "output_dir": ("Output folder", "输出目录"),
    "overwrite": ("Overwrite a finished run", "覆盖已完成的运行"),
    "resume": ("Resume from the newest checkpoint", "从最新检查点继续"),
    "extra_args": ("Extra settings: key=value per line (e.g. train.weight_decay=0.01 or weight_decay=0.01)",
                   "其他设置：每行一个 key=value（如 train.weight_decay=0.01 或 weight_decay=0.01）"),
    # panels
    "lora_panel": ("LoRA", "LoRA 参数"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha (0: 2 x rank)", "LoRA alpha（0 表示 2 倍秩）"),
    "lora_dropout": ("LoRA dropout", "LoRA 随机丢弃"),
    "lora_targets": ("LoRA target modules (comma separated, all)", "LoRA 作用模块（逗号分隔，all 为全部）"),
    "rslora": ("rsLoRA", "rsLoRA"),
    "dora": ("DoRA", "DoRA"),
    "pissa": ("PiSSA initialisation", "PiSSA 初始化"),
    "freeze_panel": ("Freeze", "冻结参数"),
    "freeze_layers": ("Trainable layers (+ from the last, - from the first)", "可训练层数（正数从末层、负数从首层计）"),
    "freeze_modules": ("Trainable modules (comma separated, all)", "可训练模块（逗号分隔，all 为全部）"),
    "quant_panel": ("Quantization", "量化参数"),
    "quant_type": ("4-bit data type", "4 比特数据类型"),
    "double_quant": ("Double quantization", "双重量化"),
    # buttons and outputs
    "preview_cmd": ("Preview command", "预览命令"),
    "save_args": ("Save args", "保存参数"),
    "load_args": ("Load args", "载入参数"),
    "args_file": ("Args file (in the config folder)", "参数文件（位于配置目录）"),
    "plan": ("Plan", "训练计划"),
    "start": ("Start", "开始"),
    "abort": ("Abort", "中断"),
    "command": ("Command and YAML", "命令与 YAML"),
    "plan_output": ("Plan: steps, memory, time", "训练计划：步数、内存、时间"),
    "status": ("Status", "状态"),
    "log": ("Log", "日志"),
    "loss_plot": ("Loss", "损失曲线"),
    "progress": ("Progress", "进度"),
    # evaluate
    "eval_dataset": ("Evaluation datasets", "评估数据集"),
    "eval_modes": ("Modes", "评估模式"),
    "eval_task": ("Benchmark (choice mode)", "基准测试（选择题模式）"),
    "eval_batch": ("Batch size", "批处理大小"),
    "eval_dir": ("Results folder", "结果目录"),
    "compare_base": ("Also evaluate the base model", "同时评估基座模型"),
    "run_eval": ("Run evaluation", "开始评估"),
    "metrics": ("Metrics", "评估指标"),
    "result_files": ("Predictions and report", "预测结果与报告"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "temperature": ("Temperature", "温度系数"),
    "top_p": ("Top-p", "Top-p 采样"),
    # chat
    "load_model": ("Load model", "加载模型"),
    "unload_model": ("Unload model", "卸载模型"),
    "model_status": ("Model status", "模型状态"),
    "system_prompt": ("System prompt", "系统提示词"),
    "compare": ("Compare with the base model", "与基座模型对比"),
    "chat_tuned": ("Tuned model", "微调后模型"),
    "chat_base": ("Base model", "基座模型"),
    "message": ("Message", "输入"),
    "send": ("Send", "发送"),
    "clear": ("Clear history", "清空历史"),
    # export
    "export_dir": ("Export folder", "导出目录"),
    "export_size": ("Largest shard (GB)", "最大分块大小（GB）"),
    "export_dtype": ("Export dtype", "导出精度"),
    "modelfile": ("Ollama Modelfile", "Ollama Modelfile"),
    "gguf": ("GGUF files", "GGUF 文件"),
    "verify": ("Verify against the unmerged model", "与未合并模型对比验证"),
    "export_overwrite": ("Replace an existing export", "覆盖已有导出"),
    "run_export": ("Export", "开始导出"),
    "export_result": ("Export result", "导出结果"),
    # table headers
    "col_metric": ("metric", "指标"),
    "col_artifact": ("artifact", "导出文件"),
    "col_diff": ("max |logit diff|", "最大 logit 差值"),
    "col_agreement": ("greedy agreement", "贪心解码一致率"),
    "col_tolerance": ("tolerance", "容差"),
    "col_result": ("result", "结果"),
    "pass": ("pass", "通过"),
    "fail": ("FAIL", "未通过"),
}

# Messages built at run time; {} fields are filled with str.format.
MESSAGES: dict[str, tuple[str, str]] = {
    "idle": ("Ready.", "就绪。"),
    "running": ("Training: step {step} of {total}, loss {loss}, ETA {eta}",
                "训练中：第 {step}/{total} 步，损失 {loss}，剩余 {eta}"),
    "starting": ("Starting: loading the model and the data...", "启动中：正在加载模型和数据……"),
    "finished": ("Finished: the run is in {folder}", "训练完成：结果位于 {folder}"),
    "failed": ("Failed: {error}", "训练失败：{error}"),
    "aborted": ("Aborted: a checkpoint was saved if a step had finished", "已中断：若已完成训练步，检查点已保存"),
    "busy": ("A training run is already in progress; abort it first.", "已有训练在进行中，请先中断。"),
    "saved": ("Saved {path}", "已保存 {path}"),
    "loaded": ("Loaded {path}", "已载入 {path}"),
    "model_loaded": ("Loaded: {model}", "已加载：{model}"),
    "model_unloaded": ("No model loaded.", "未加载模型。"),
    "load_first": ("Load a model first.", "请先加载模型。"),
    "export_passed": ("Export written to {folder}; every check passed.", "已导出到 {folder}，全部验证通过。"),
    "export_failed": ("Export written to {folder}, but a check FAILED.", "已导出到 {folder}，但有验证未通过。"),
    "export_unverified": ("Export written to {folder} (not verified).", "已导出到 {folder}（未验证）。"),
    "eval_done": ("Evaluation written to {folder}", "评估结果已写入 {folder}"),
    "error": ("Error: {error}", "错误：{error}"),
    "files": ("files: {files}", "文件：{files}"),
    "eta": ("ETA {eta}", "剩余 {eta}"),
    "preview_summary": ("{raw} raw rows, {encoded} encoded training rows | template {template} | truncated "
                        "{truncated} | dropped {dropped} | page {page} / {pages}",
                        "原始数据 {raw} 条，编码后训练数据 {encoded} 条 | 模板 {template} | 截断 {truncated} 条 | "
                        "丢弃 {dropped} 条 | 第 {page} / {pages} 页"),
    "row_head": ("{origin} [{part}: {tokens} tokens, {trained} trained]",
                 "{origin} [{part}：{tokens} 个 token，其中 {trained} 个参与训练]"),
    "model_desc": ("{model} | adapters: {adapters} | template {template}", "{model} | 适配器：{adapters} | 模板 {template}"),
}


def text(key: str, lang: str) -> str:
    """A label in the chosen language."""
    return STRINGS[key][LANGUAGES.index(lang)]


def message(key: str, lang: str, **fields: object) -> str:
    """A run-time message in the chosen language with its fields filled in."""
    return MESSAGES[key][LANGUAGES.index(lang)].format(**fields)
