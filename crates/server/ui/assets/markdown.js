// Model output is untrusted. It is rendered as Markdown (marked, GitHub flavour) and
// the HTML that comes out is sanitized (DOMPurify) before it reaches the page:
//
// - raw HTML in the text is shown as text, not interpreted (a model that writes
//   `<div>` in prose meant the characters, and nothing it writes can become markup);
// - Markdown images become links: an image URL is fetched the moment it is shown, so
//   a prompt-injected answer could leak the conversation through one; and the page's
//   CSP allows no other origin anyway;
// - DOMPurify then drops whatever could still run script or load something (event
//   handler attributes, `javascript:` URLs, `<script>`, `<style>`, forms, SVG/MathML);
// - links open in a new tab with no opener and no referrer.
//
// The page's Content-Security-Policy (no inline script) is the second wall.

import { Marked } from './vendor/marked.mjs';
import DOMPurify from './vendor/purify.mjs';

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

const marked = new Marked({
  gfm: true,
  breaks: false,
  async: false,
  renderer: {
    html(token) {
      return escapeHtml(token.text);
    },
    image(token) {
      const label = token.text || token.href;
      return `<a href="${escapeHtml(token.href)}">${escapeHtml(label)}</a>`;
    },
  },
});

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ['img', 'style', 'form', 'input', 'button', 'textarea', 'select', 'option', 'video', 'audio', 'source', 'picture'],
  FORBID_ATTR: ['style', 'id', 'name', 'srcset'],
  ALLOW_DATA_ATTR: false,
};

/** Markdown → sanitized HTML, safe to put in the page. */
export function renderMarkdown(text) {
  const html = marked.parse(text || '');
  return DOMPurify.sanitize(html, PURIFY);
}
