-- Prints wrk's summary as one JSON line for bench/http_overhead.py.
-- Only done() is defined: a request() or response() hook would slow wrk itself.
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"latency_p50_us":%d,"latency_p90_us":%d,"latency_p99_us":%d,"latency_max_us":%d,"latency_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
