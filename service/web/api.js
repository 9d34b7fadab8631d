// The API client: JSON in and out, the session's API key as a Bearer token, and every error
// as an ApiError carrying the status, the message and the field at fault (ErrorDetail).

const KEY_STORAGE = "steer.apiKey";

export class ApiError extends Error {
  constructor(status, message, field = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE),
  set: (value) => sessionStorage.setItem(KEY_STORAGE, value),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

function messageOf(data, response) {
  const detail = data?.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg ?? JSON.stringify(d)).join("; ");
  return `${response.status} ${response.statusText || "error"}`;
}

// Paths are relative ("v1/…"), so the page also works behind a path prefix.
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, `the server did not answer (${err.message}); is it running?`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, messageOf(data, response), data?.field ?? null,
      response.headers.get("Retry-After"));
  }
  return data;
}

// GET that answers null instead of failing when the endpoint does not exist (404).
export async function optional(path) {
  try {
    return await api(path);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}
