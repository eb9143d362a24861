// Markdown for model replies, built as DOM nodes: every piece of the reply becomes a text node,
// never HTML, so a reply holding <script> or <img onerror=...> shows as the characters it is.
// It covers what chat models write: fenced code (with a copy button), headings, lists, tables,
// quotes, rules, paragraphs, and inline code, bold, italic and http(s) links. A fence still open
// while the reply streams shows as code so far.

const FENCE = /^ {0,3}(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^ {0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^ {0,3}(\d{1,9})[.)]\s+(.*)$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

function el(tag, children = [], attrs = {}) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function codeBlock(text, lang) {
  const code = el("code", [document.createTextNode(text)]);
  if (lang) code.dataset.lang = lang;
  const copy = el("button", ["Copy"], { type: "button", class: "copy", "aria-label": "Copy the code" });
  copy.addEventListener("click", () => copyText(text, copy));
  return el("div", [el("div", [el("span", [lang || "code"]), copy], { class: "code-head" }), el("pre", [code])],
            { class: "code" });
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (a page served over plain http to another machine): copy a selection.
    const area = el("textarea", [], { "aria-hidden": "true", class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// Inline markup: `code`, **bold**, *italic* / _italic_, [text](http://...). Returns nodes.
export function inline(text) {
  const out = [];
  const pattern = /`([^`]+)`|\*\*(.+?)\*\*|__(.+?)__|(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?!\w)|(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let at = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > at) out.push(document.createTextNode(text.slice(at, m.index)));
    if (m[1] !== undefined) out.push(el("code", [document.createTextNode(m[1])]));
    else if (m[2] !== undefined || m[3] !== undefined) out.push(el("strong", inline(m[2] ?? m[3])));
    else if (m[4] !== undefined || m[5] !== undefined) out.push(el("em", inline(m[4] ?? m[5])));
    else out.push(link(m[6], m[7]));
    at = m.index + m[0].length;
  }
  if (at < text.length) out.push(document.createTextNode(text.slice(at)));
  return out;
}

function link(label, target) {
  let url = null;
  try {
    url = new URL(target);
  } catch {
    url = null;
  }
  // Only web links: a javascript: or data: URL in a reply stays text.
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    return document.createTextNode(`[${label}](${target})`);
  }
  return el("a", inline(label), { href: url.href, target: "_blank", rel: "noopener noreferrer nofollow" });
}

function paragraph(lines) {
  const p = el("p");
  lines.forEach((line, i) => {
    if (i) p.append(el("br"));
    p.append(...inline(line));
  });
  return p;
}

// The reply as a DocumentFragment.
export function render(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const out = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(m[1])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end of a reply still streaming)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if (!line.trim()) {
      i += 1;
    } else if ((m = line.match(HEADING))) {
      out.append(el(`h${Math.min(m[1].length + 2, 6)}`, inline(m[2])));
      i += 1;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i += 1;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const head = cells(line);
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(cells(lines[i++]));
      const thead = el("thead", [el("tr", head.map((c) => el("th", inline(c))))]);
      const tbody = el("tbody", rows.map((r) => el("tr", head.map((_, k) => el("td", inline(r[k] ?? ""))))));
      out.append(el("div", [el("table", [thead, tbody])], { class: "table" }));
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i += 1; }
      out.append(el("blockquote", [render(body.join("\n"))]));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const kind = ordered ? NUMBERED : BULLET;
      const list = el(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(line.match(NUMBERED)[1]);
        if (start !== 1) list.setAttribute("start", String(start));
      }
      while (i < lines.length) {
        if ((m = lines[i].match(kind))) {
          list.append(el("li", inline(ordered ? m[2] : m[1])));
        } else if (/^\s{2,}\S/.test(lines[i]) && list.lastChild) {
          list.lastChild.append(el("br"), ...inline(lines[i].trim())); // a continued or nested item, kept flat
        } else {
          break;
        }
        i += 1;
      }
      out.append(list);
    } else {
      const body = [];
      while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
             && !BULLET.test(lines[i]) && !NUMBERED.test(lines[i]) && !QUOTE.test(lines[i])) {
        body.push(lines[i++]);
      }
      if (!body.length) body.push(lines[i++]);
      out.append(paragraph(body));
    }
  }
  return out;
}
