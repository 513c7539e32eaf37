"""wattserve engine: scheduler, paged KV cache, model runner, sampling."""
